"""torchrun, exiting with the ranks' own exit code (75 after a preemption) instead of torchrun's 1:

    python scripts/launch.py --nproc_per_node 8 scripts/train.py [--section.key=value ...]

Takes every torchrun option; docs/reliability.md says when a scheduler needs it.
"""
import sys

import _path  # noqa: F401

from ldm_ddp.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
