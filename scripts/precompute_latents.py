"""Encode a dataset once into a latent cache; train from it with --data.source=latents --data.path=OUT.

    python scripts/precompute_latents.py OUT [--vae-dtype bf16|fp32] [--batch 32] [--shard-size 4096]
        [--preset NAME] [--config FILE] [--section.key=value ...]
    torchrun --nproc_per_node 8 scripts/precompute_latents.py /data/latents --preset sd15_256 \\
        --model.pretrained=/data/sd15 --data.source=shards --data.path=/data/shards

The model and data settings are the training run's (same preset, config file and overrides): the
cache records the VAE weights, tokenizer, resolution, crop and flip rules, the aspect-ratio buckets
(--data.buckets=auto or a list: each image encoded at its bucket's shape) and the VAE dtype, and a
training run with other values refuses it. Under torchrun each rank writes its share of the shards.
"""
import argparse
import sys

import _path  # noqa: F401

from ldm_ddp import dist
from ldm_ddp.config import ConfigError, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="cache folder (local)")
    parser.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="",
                        help="default: model.frozen_dtype")
    parser.add_argument("--batch", type=int, default=32, help="images per VAE forward")
    parser.add_argument("--shard-size", type=int, default=4096, help="samples per cache shard")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args()
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
        from ldm_ddp.precompute import precompute_latents
        precompute_latents(cfg, args.out, args.vae_dtype, args.batch, args.shard_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
