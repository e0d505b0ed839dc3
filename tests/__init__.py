"""The test suite (a package, so tests import ``tests.support`` and ``scripts``; see README.md)."""
