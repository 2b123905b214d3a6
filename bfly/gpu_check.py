"""`python -m bfly.gpu_check`: the command; its code lives in bfly/tools/gpu_check.py."""

import sys

from bfly.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
