"""The EMA update's time on a GPU: the one-pass Triton kernel (the trainer's path on CUDA) against the three
foreach passes (the portable path) and the torch.compile'd update, for the SD1.5 UNet's 860 M weights
(channels-last, as the trainer holds them), with one profile and with three; and that the kernel's shadows are
bit-identical to the foreach passes'.

    python scripts/bench_ema.py [--unet sd15] [--updates 20] [--blocks 4096:8 ...] [--compiled] [--json OUT]

Times are CUDA events around each update (every kernel of it: the weights' stack, the passes), the mean of
--updates after 3; GB/s counts the bytes the update must move (read the weights and each shadow, write each
shadow).
"""
import argparse
import json
import sys

import _path  # noqa: F401
import torch


def time_updates(ema, unet, updates: int) -> float:
    """Mean ms of an update, after 3 untimed ones."""
    for _ in range(3):
        ema.update(unet)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(updates):
        ema.update(unet)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / updates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--blocks", nargs="*", default=["8192:16"], metavar="BLOCK:WARPS",
                        help="the kernel's elements per program and warps per program, each timed")
    parser.add_argument("--compiled", action="store_true", help="also time EMA.compile's update")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from ldm_ddp import ema_kernel
    from ldm_ddp.config import EMAConfig, ModelConfig
    from ldm_ddp.ema import EMA
    from ldm_ddp.models import build_unet

    device = torch.device("cuda")
    width, pooled = (2048, 1280) if args.unet == "sdxl" else (768, 0)
    unet = build_unet(ModelConfig(unet=args.unet), 64 if args.unet == "sd15" else 128, width, device, pooled)
    gigabytes = sum(p.numel() for p in unet.parameters()) * 4 / 1e9
    figures = {"unet": args.unet, "weights_gb": round(gigabytes, 2), "card": torch.cuda.get_device_name(),
               "torch": torch.__version__, "rows": []}
    for profiles, cfg in ((1, EMAConfig(decay=0.9999)),
                          (3, EMAConfig(decay=0.9999, extra_decays=[0.999], power_stds=[0.1]))):
        moved = gigabytes * (1 + 2 * profiles)  # read the weights and each shadow, write each shadow

        def record(path: str, ms: float, profiles=profiles, moved=moved) -> None:
            figures["rows"].append({"path": path, "profiles": profiles, "ms": ms,
                                    "gb_per_s": moved / ms * 1e3})

        for block in args.blocks:
            ema_kernel.BLOCK, ema_kernel.NUM_WARPS = map(int, block.split(":"))
            ema = EMA(unet, cfg)
            if ema.one_pass is None or not ema.one_pass.fits(ema._weights(unet)):
                raise SystemExit("the one-pass kernel is not used (no Triton, or the weights do not fit)")
            record(f"one pass (block {block})", time_updates(ema, unet, args.updates))
            del ema
        ema = EMA(unet, cfg)
        ema.one_pass = None
        record("foreach, three passes", time_updates(ema, unet, args.updates))
        if args.compiled:
            ema.compile()
            record("torch.compile", time_updates(ema, unet, args.updates))
        del ema
        torch.cuda.empty_cache()

    # bits: the same updates through both paths, the weights moved between them, one step skipped
    cfg = EMAConfig(decay=0.99, extra_decays=[0.9], power_stds=[0.1])
    kernel, foreach = EMA(unet, cfg), EMA(unet, cfg)
    foreach.one_pass = None
    with torch.no_grad():
        for step in range(4):
            torch._foreach_add_(list(unet.parameters()), 1e-3 * (step + 1))
            ok = torch.tensor(step != 2, device=device)
            kernel.update(unet, ok)
            foreach.update(unet, ok)
    figures["bit_identical"] = all(torch.equal(a, b) for x, y in zip(kernel.shadows, foreach.shadows)
                                   for a, b in zip(x, y))
    for row in figures["rows"]:
        print(f"{row['path']:<28} {row['profiles']} profile(s) {row['ms']:7.2f} ms "
              f"{row['gb_per_s']:6.0f} GB/s")
    print(f"bit-identical to the foreach passes: {figures['bit_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if figures["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
