"""`python -m bfly.evaluate`: the command; its code lives in bfly/tools/evaluate.py."""

import sys

from bfly.core.errors import one_line_warnings
from bfly.tools.evaluate import main

if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
