"""Train a text-to-image LDM:
`python scripts/train.py [--preset NAME] [--config FILE] [--section.key=value ...]`.

Under torchrun, one process per GPU. Running the same command again resumes from the newest
valid checkpoint in train.out_dir. `--dry-run` prints the resolved config and exits.
"""
import sys

import _path  # noqa: F401

from ldm_ddp.cli import run_training


def train(cfg):
    from ldm_ddp.train_loop import (
        train,  # imported late: --dry-run and config errors stay fast
    )
    return train(cfg)


if __name__ == "__main__":
    sys.exit(run_training(__doc__, "demo", train))
