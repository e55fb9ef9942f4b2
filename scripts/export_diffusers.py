"""Export a training checkpoint as a diffusers pipeline folder.

    python scripts/export_diffusers.py CKPT OUT [--dtype fp16|bf16|fp32]
        [--weights ema|raw|ema:0.9999|ema:std=0.1]

`StableDiffusionPipeline.from_pretrained(OUT)` then samples like scripts/sample.py (same DDIM,
v-prediction, zero-terminal-SNR and trailing spacing).
"""
import argparse
import sys

import _path  # noqa: F401

from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.config import ConfigError
from ldm_ddp.export import EXPORT_DTYPES, export_diffusers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="fp16", choices=sorted(EXPORT_DTYPES))
    parser.add_argument("--weights", default="ema", metavar="ema|raw|ema:DECAY|ema:std=SIGMA_REL",
                        help="the default EMA, the raw weights, or another EMA profile of the checkpoint "
                             "(scripts/inspect_checkpoint.py lists them)")
    args = parser.parse_args()
    try:
        out = export_diffusers(args.checkpoint, args.out, args.dtype, args.weights)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.weights} weights, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
