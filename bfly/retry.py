"""`python -m bfly.retry`: the command; its code lives in bfly/job/retry.py."""

import sys

from bfly.job.retry import main

if __name__ == "__main__":
    sys.exit(main())
