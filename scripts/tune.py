"""Hyperparameter search: an Optuna study of real training runs, shared by every tuner that runs it.

    python scripts/tune.py --preset demo | --space SPACE.toml [--study NAME] [--out runs/tune_NAME]
        [--storage sqlite:///runs/tune_NAME/study.db] [--nproc 1] [--section.key=value ...]

--preset NAME is the space ldm_ddp/presets/tune/NAME.toml (demo: learning rate, warmup and EMA decay of the
CPU demo, 6 short trials).

The space file (TOML) holds [study] (objective = val_loss | best_val_loss | demo_all, pruner = median |
hyperband | none, trials, preset), [params] (each --section.key searched: {type = "float" | "int",
low, high, log} or {type = "categorical", choices = [...]}) and [fixed] (overrides of every trial, e.g.
train.max_steps and val.every). Other --section.key=value arguments also go to every trial. Each trial is
scripts/train.py (or torchrun with --nproc > 1) in <out>/trial_NNNN. Run the same command on other machines
against one database (--storage postgresql://...) to share the study; run it again after a crash to go on.
Results: <out>/trials.md, <out>/best.toml (for scripts/train.py --config) and <out>/tune.png.
"""
import argparse
import sys
from pathlib import Path

import _path  # noqa: F401

from ldm_ddp.config import ConfigError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--space", help="the search-space TOML")
    source.add_argument("--preset", help="a built-in space: ldm_ddp/presets/tune/<NAME>.toml")
    parser.add_argument("--study", default="", help="study name (default: the space file's name)")
    parser.add_argument("--out", default="", help="trial folders and results (default: runs/tune_<study>)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: sqlite:///<out>/study.db)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per trial (torchrun when > 1)")
    args, extra = parser.parse_known_args()
    try:
        from ldm_ddp.tune import TrialsCrashed, read_space, tune
    except ImportError as err:  # optuna is an extra
        print(f"error: {err}; pip install optuna", file=sys.stderr)
        return 1
    space_file = args.space or str(Path(__file__).resolve().parents[1] / "ldm_ddp" / "presets" / "tune"
                                   / f"{args.preset}.toml")
    name = args.study or Path(space_file).stem
    out = Path(args.out or f"runs/tune_{name}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        space = read_space(space_file)
        tune(space, args.storage or f"sqlite:///{out / 'study.db'}", name, out, extra, args.nproc)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except TrialsCrashed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
