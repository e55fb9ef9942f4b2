"""GPU cost of a Diffusion-DPO step against a diffusion step: the SD1.5 UNet (random weights, random
latents and contexts), bf16 autocast, eager, fused AdamW, the objectives called as the trainer calls them.

    python scripts/bench_dpo.py [--res 512] [--images 16] [--steps 10] [--warmup 3] [--json OUT]

A DPO step on N images is N/2 pairs: the trained model's forward and backward on all N, and the frozen
reference's forward on all N.
"""
import argparse
import json
import sys
import time

import _path  # noqa: F401
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=512, help="px (latents of res / 8)")
    parser.add_argument("--images", type=int, default=16, help="images per step (DPO: half as many pairs)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench_dpo.py measures a GPU; none is visible", file=sys.stderr)
        return 1
    from ldm_ddp.config import ModelConfig
    from ldm_ddp.models import build_unet
    from ldm_ddp.objectives import DiffusionDPOLoss, VPredictionLoss
    from ldm_ddp.schedule import NoiseSchedule

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet="sd15"), args.res // 8, 768, device)  # channels-last on CUDA
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, fused=True)
    figures = {}
    for name, pairs in (("diffusion", 0), ("dpo", args.images // 2)):
        objective = (DiffusionDPOLoss(schedule, unet, 2500.0, True, {}) if pairs
                     else VPredictionLoss(schedule))
        latents = torch.randn(args.images, 4, args.res // 8, args.res // 8, device=device)
        context = torch.randn(pairs or args.images, 77, 768, device=device)
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = objective(unet, latents, {"encoder_hidden_states": context},
                             torch.Generator(device).manual_seed(i), True)
            loss.weighted.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        figures[name] = {"s_per_step": round(seconds, 4), "img_per_s": round(args.images / seconds, 1),
                         "pairs_per_s": round(pairs / seconds, 1) if pairs else None,
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(name, figures[name], flush=True)
        del objective
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), **figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
