"""torchrun entry point: ``torchrun --nproc_per_node=2 launch/train_cifar.py --norm syncbn --out runs/syncbn``.

All options: ``python launch/train_cifar.py --help``. The logic lives in bnstudy.training (launcher, loop).
"""

import sys

from bnstudy.training.launcher import main

if __name__ == "__main__":
    sys.exit(main())
