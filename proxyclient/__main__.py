"""`python -m proxyclient ...`: the same as the `proxyclient` command."""

import sys

from proxyclient.cli import main

if __name__ == "__main__":
    sys.exit(main())
