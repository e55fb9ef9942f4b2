"""Measure prompt adherence of a demo checkpoint with the rule-based shapes checker.

    python scripts/evaluate_demo.py CKPT [--prompts 180] [--seed 100000] [--weights ema] [--json]

`--weights`: ema (the default EMA), raw, or any EMA profile the checkpoint keeps (ema:0.9999,
ema:std=0.1; scripts/inspect_checkpoint.py lists them), so profiles can be compared on one score.

Samples one image per prompt (the canonical captions of all colour x shape x size x position
combinations, or the first N of them in a fixed shuffled order) with seeds never used by live
sampling, checks each image and prints the accuracy of each attribute.
"""
import argparse
import json
import random
import sys

import _path  # noqa: F401
import torch

from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.config import ConfigError
from ldm_ddp.data.shapes import all_prompts
from ldm_ddp.models import load_trained
from ldm_ddp.sampling import generate, make_grid
from ldm_ddp.schedule import NoiseSchedule
from ldm_ddp.shapes_check import score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=180, help="how many prompts (64..180)")
    parser.add_argument("--seed", type=int, default=100_000,
                        help="first noise seed (held out from live sampling)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the run's sample.steps)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    parser.add_argument("--weights", default="ema", metavar="ema|raw|ema:DECAY|ema:std=SIGMA_REL",
                        help="the default EMA, the raw weights, or another EMA profile of the checkpoint")
    parser.add_argument("--grid", help="also write the images to this PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg, unet, frozen = load_trained(args.checkpoint, args.weights, device)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    targets = all_prompts()
    random.Random(0).shuffle(targets)
    targets = targets[:max(64, min(args.prompts, len(targets)))]
    d, s = cfg.diffusion, cfg.sample
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    seeds = [args.seed + i for i in range(len(targets))]
    images = generate(unet, frozen, schedule, [t["caption"] for t in targets], seeds, args.steps or s.steps,
                      s.cfg_scale if args.cfg is None else args.cfg, s.guidance_rescale, s.spacing,
                      autocast=device.type == "cuda")
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    result = score(list(pixels), targets)
    result.update(checkpoint=args.checkpoint, weights=args.weights, steps=args.steps or s.steps,
                  cfg=s.cfg_scale if args.cfg is None else args.cfg)
    if args.grid:
        make_grid(images, nrow=12).save(args.grid)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['n']} prompts, {args.weights} weights: " + "  ".join(
            f"{k} {100 * result[k]:.1f}%" for k in ("colour", "shape", "size", "position", "all")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
