"""What the tests share that is not a fixture: fixture servers of each dialect, fault proxies,
references, in-process bases, other tokenizers and constants (tests/README.md, "Layout")."""
