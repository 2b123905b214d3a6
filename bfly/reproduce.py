"""`python -m bfly.reproduce`: the command; its code lives in bfly/tools/reproduce.py."""

import sys

from bfly.tools.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
