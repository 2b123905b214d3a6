"""`python -m bfly.bench`: the command; its code lives in bfly/tools/bench.py."""

import sys

from bfly.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
