"""``python -m flowplugins``: the same command line as the ``flowplugins`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
