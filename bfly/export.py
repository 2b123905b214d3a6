"""`python -m bfly.export`: the command; its code lives in bfly/tools/export.py."""

import sys

from bfly.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
