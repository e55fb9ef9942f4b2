"""Generate images from a training checkpoint with DDIM + classifier-free guidance.

    python scripts/sample.py CKPT --prompt "a large red circle in the center" [--prompt ...]
        [--steps 25] [--cfg 3.0] [--rescale 0.7] [--seed 0] [--n 4] [--out samples.png]
        [--weights ema|raw|ema:0.9999|ema:std=0.1] [--width 512 --height 256]

Image i of prompt p uses seed + p * n + i; one grid is written (a row per prompt).
--width and --height (px) default to the run's square data.resolution; another size must be a multiple
of 8 x the VAE's downsampling factor (64 px for SD's VAE).
Sampler settings default to the run's [sample] config.
"""
import argparse
import sys

import _path  # noqa: F401
import torch

from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.config import ConfigError
from ldm_ddp.models import load_trained
from ldm_ddp.sampling import generate, make_grid, size_error
from ldm_ddp.schedule import NoiseSchedule


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--steps", type=int, help="DDIM steps")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    parser.add_argument("--rescale", type=float, help="guidance rescale (Lin et al. 2024)")
    parser.add_argument("--spacing", choices=["leading", "trailing"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--weights", default="ema", metavar="ema|raw|ema:DECAY|ema:std=SIGMA_REL",
                        help="the default EMA, the raw weights, or another EMA profile of the checkpoint "
                             "(scripts/inspect_checkpoint.py lists them)")
    parser.add_argument("--width", type=int, help="px (default: the run's data.resolution)")
    parser.add_argument("--height", type=int, help="px (default: the run's data.resolution)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args()
    try:
        cfg, unet, frozen = load_trained(args.checkpoint, args.weights, torch.device(args.device))
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    d, s = cfg.diffusion, cfg.sample
    # The run's own resolution samples as it trained (its latent need not be a multiple of 8); a size asked
    # for must fit the UNet's downsamplings.
    width, height = (cfg.data.resolution if v is None else v for v in (args.width, args.height))
    if (args.width, args.height) != (None, None) and (error := size_error(width, height, frozen.downsample)):
        print(f"error: --width/--height: {error}", file=sys.stderr)
        return 2
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = generate(unet, frozen, schedule, prompts, seeds, args.steps or s.steps,
                      s.cfg_scale if args.cfg is None else args.cfg,
                      s.guidance_rescale if args.rescale is None else args.rescale,
                      args.spacing or s.spacing, autocast=args.device == "cuda", size=(width, height))
    make_grid(images, nrow=args.n).save(args.out)
    print(f"wrote {args.out} ({len(images)} images of {width}x{height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
