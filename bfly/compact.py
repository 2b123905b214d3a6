"""`python -m bfly.compact`: the command; its code lives in bfly/tools/compact.py."""

import sys

from bfly.core.errors import one_line_warnings
from bfly.tools.compact import main

if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
