"""Make the demo's preference set from a demo checkpoint's own samples, judged by the shapes checker.

    python scripts/make_demo_pairs.py [CKPT] [--out runs/demo_pairs] [--per-prompt 8] [--weights ema]

CKPT defaults to the demo's last checkpoint (runs/demo/checkpoints/step_0001200.safetensors). Each of the
180 captions is sampled --per-prompt times; each image the checker finds wrong becomes a rejected image,
paired with a right one of the same caption (or the caption's rendering). Then:

    python scripts/train.py --preset dpo_demo
"""
import argparse
import sys
from pathlib import Path

import _path  # noqa: F401

from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.config import ConfigError

DEMO_CHECKPOINT = "runs/demo/checkpoints/step_0001200.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=DEMO_CHECKPOINT)
    parser.add_argument("--out", default="runs/demo_pairs", help="the pairs folder (img/, pairs.jsonl)")
    parser.add_argument("--per-prompt", type=int, default=8, help="samples per caption")
    parser.add_argument("--weights", default="ema", help="ema | raw | ema:DECAY | ema:std=S")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the run's sample.steps)")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        print(f"error: no checkpoint {args.checkpoint} (train the demo first: python scripts/train.py)",
              file=sys.stderr)
        return 1
    from ldm_ddp.preference import make_demo_pairs
    try:
        counts = make_demo_pairs(args.checkpoint, args.out, args.per_prompt, args.weights, args.steps)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{counts['images']} samples, {counts['right']} right; {counts['pairs']} pairs in {args.out} "
          f"({counts['rendered']} captions with no right sample use their rendering)")
    return 0 if counts["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
