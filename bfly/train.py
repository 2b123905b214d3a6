"""`python -m bfly.train`: the command; its code lives in bfly/job/train.py."""

import sys

from bfly.job.train import _command

if __name__ == "__main__":
    sys.exit(_command())
