"""The repository's scripts, a package so that the tests and the scripts import each other as
``scripts.NAME``; each still runs as ``python scripts/NAME.py`` (or ``python -m scripts.NAME``)."""
