"""`python -m bfly.nodecheck`: the command; its code lives in bfly/job/nodecheck.py."""

import sys

from bfly.job.nodecheck import main

if __name__ == "__main__":
    sys.exit(main())
