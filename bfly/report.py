"""`python -m bfly.report`: the command; its code lives in bfly/tools/report.py."""

import sys

from bfly.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
