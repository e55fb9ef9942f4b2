"""Train a text-to-image LDM: `python scripts/train.py [--preset NAME] [--config FILE] [--section.key=value ...]`.

Under torchrun, one process per GPU. Running the same command again resumes from the newest
valid checkpoint in train.out_dir. `--dry-run` prints the resolved config and exits.
"""
import argparse
import sys

import _path  # noqa: F401

from ldm_ddp import dist
from ldm_ddp.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="named recipe in ldm_ddp/presets (default: demo)")
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
    from ldm_ddp.train_loop import train
    try:
        train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
