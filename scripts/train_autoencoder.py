"""Stage 1: train the AutoencoderKL
(`python scripts/train_autoencoder.py --preset demo_vae [--section.key=value ...]`).

Same config, data stream, DDP launch and checkpoints as scripts/train.py; at the end it writes
<out_dir>/bundle/{vae,text_encoder,tokenizer}, a folder `model.pretrained` can point at.
"""
import sys

import _path  # noqa: F401

from ldm_ddp.cli import run_training


def train_autoencoder(cfg):
    from ldm_ddp.autoencoder import (
        train_autoencoder,  # imported late: --dry-run stays fast
    )
    return train_autoencoder(cfg)


if __name__ == "__main__":
    sys.exit(run_training(__doc__, "demo_vae", train_autoencoder))
