"""The command line of the training entry points (scripts/train.py, scripts/train_autoencoder.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import dist
from .config import Config, ConfigError, load_config


def run_training(doc: str, default_preset: str, train: Callable[[Config], object]) -> int:
    """Parse `--preset/--config/--dry-run` and `--section.key=value`, then run `train(cfg)`; -> exit code.

    A bad config (or one the run finds unusable before its first step) is one line on stderr, exit 2.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, help=f"named recipe in ldm_ddp/presets "
                                                                   f"(default: {default_preset})")
    parser.add_argument("--config", help="TOML file applied over the preset")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args()
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
        if args.dry_run:
            print(cfg.to_toml())
            return 0
        train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0
