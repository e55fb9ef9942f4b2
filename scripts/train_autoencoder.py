"""Stage 1: train the AutoencoderKL (`python scripts/train_autoencoder.py --preset demo_vae [--section.key=value ...]`).

Same config, data stream, DDP launch and checkpoints as scripts/train.py; at the end it writes
<out_dir>/bundle/{vae,text_encoder,tokenizer}, a folder `model.pretrained` can point at.
"""
import argparse
import sys

import _path  # noqa: F401

from ldm_ddp import dist
from ldm_ddp.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo_vae", help="named recipe in ldm_ddp/presets (default: demo_vae)")
    parser.add_argument("--config", help="TOML file applied over the preset")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args()
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_toml())
        return 0
    from ldm_ddp.autoencoder import train_autoencoder
    try:
        train_autoencoder(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
