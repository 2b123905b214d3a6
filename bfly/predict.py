"""`python -m bfly.predict`: the command; its code lives in bfly/tools/predict.py."""

import sys

from bfly.core.errors import one_line_warnings
from bfly.tools.predict import main

if __name__ == "__main__":
    one_line_warnings()
    sys.exit(main())
