"""The bare UNet training step on random tensors, one process per GPU: scripts/bench.py's `bare` and
`ceiling` rows, and variants of the EMA timed in the same process.

    torchrun --nproc_per_node N scripts/bench_bare.py --res 256 --batch 64 [--steps 40] [--warmup 8]
        [--profile] [the switches of scripts/bench.py: --compile, --sdpa, --ema-every, ...]

The step as configured is the trainer's: forward and backward under bf16 autocast (channels-last), gradient
clipping, fused AdamW, the EMA update; DDP as the trainer wraps it, compiled as it compiles. The ceiling is
the same compiled UNet's forward, backward and fused AdamW alone (no clipping, no EMA): the most the
trainer's step could reach. Rank 0 prints one line, `BENCH {json}`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import _path  # noqa: F401
import torch

# The step's variants timed in the same process, as the table names them.
VARIANTS = {"ceiling": "forward, backward and fused AdamW alone: no gradient clipping, no EMA",
            "ema_inline": "the EMA after the optimizer step, as the trainer does it",
            "ema_beside_forward": "the EMA update on a side stream beside the next step's forward "
                                  "(--ema-overlap on)",
            "ema_compiled": "the EMA update through torch.compile"}
# The switches, as scripts/bench.py passes them on (--name value) and each row records.
SWITCHES = ("unet", "compile", "cuda_graphs", "fp8", "sdpa", "cudnn_benchmark", "channels_last", "layout_opt",
            "ddp_compile", "static_graph", "bucket_cap_mb", "grad_reduce", "shard_optimizer", "ema_every",
            "ema_compile", "ema_overlap")


def add_switches(parser: argparse.ArgumentParser) -> None:
    """The bare step's switches (SWITCHES), for this script and scripts/bench.py (whose trainer rows take
    --compile and --ema-every too)."""
    parser.add_argument("--unet", default="sd15", choices=["sd15", "sdxl"],
                        help="bare: the UNet architecture (sdxl: 2.57 B parameters, SDXL's added embedding)")
    parser.add_argument("--compile", default="full", choices=["off", "full", "regional"],
                        help="torch.compile of the UNet, as train.compile (bare and trainer)")
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                        help="the compiled UNet as CUDA graphs, as train.cuda_graphs (bare and trainer)")
    parser.add_argument("--fp8", default="off", choices=["on", "off"],
                        help="the transformer linears in float8 (torchao), as train.fp8 (bare and trainer)")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                        help="bare step: the SDPA kernel (auto: PyTorch's choice)")
    parser.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"],
                        help="bare step: cuDNN autotuning (the trainer: on)")
    parser.add_argument("--channels-last", default="on", choices=["on", "off"],
                        help="bare step: channels-last weights (the trainer: on)")
    parser.add_argument("--layout-opt", default="auto", choices=["auto", "on", "off"],
                        help="bare step: inductor's layout optimization forced "
                             "(auto: where the graph is whole)")
    parser.add_argument("--ddp-compile", default="whole", choices=["whole", "split"],
                        help="bare step: one compiled graph under DDP, or one per bucket "
                             "(the trainer: whole)")
    parser.add_argument("--static-graph", default="off", choices=["on", "off"],
                        help="bare step: DDP static_graph (the trainer: off)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0,
                        help="bare step: DDP bucket size, MB (the trainer: 25)")
    parser.add_argument("--grad-reduce", default="fp32", choices=["fp32", "bf16"],
                        help="DDP's gradient all-reduce, as train.grad_reduce (bare and trainer)")
    parser.add_argument("--shard-optimizer", default="off", choices=["on", "off"],
                        help="AdamW split over the ranks in place of DDP, as train.shard_optimizer (bare and "
                             "trainer)")
    parser.add_argument("--ema-every", type=int, default=1, help="as ema.update_every")
    parser.add_argument("--ema-compile", default="off", choices=["on", "off", "both"],
                        help="bare step: the EMA update through torch.compile; both: eager and compiled in "
                             "one process")
    parser.add_argument("--ema-overlap", default="off", choices=["on", "off"],
                        help="bare step: the EMA update beside the next forward on a side stream "
                             "(the trainer: off); the other setting is timed too, in the same process")


def matmul_tflops(device) -> float:
    """This card's bf16 dense matmul rate: 8192^3 products, best of a few timed batches."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 20 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12)
    return best


def bare_worker(args) -> None:
    from ldm_ddp import dist, faults, speed
    from ldm_ddp.conditioning import map_cond
    from ldm_ddp.config import EMAConfig, ModelConfig
    from ldm_ddp.ema import EMA
    from ldm_ddp.metrics import count_train_flops
    from ldm_ddp.models import build_unet
    from ldm_ddp.sharded_adamw import ShardedAdamW

    device = dist.init("cuda")
    speed.configure_cuda(args.cudnn_benchmark == "on")
    res, batch = args.res, args.batch
    h = res // 8
    layout = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    width, pooled = (768 + 1280, 1280) if args.unet == "sdxl" else (768, 0)  # context and pooled widths
    unet = build_unet(ModelConfig(unet=args.unet), h, width, device, pooled).to(memory_format=layout)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, width, device=device)}
    if pooled:  # SDXL's added embedding: the pooled text embedding and 6 size/crop ids
        ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device).float()
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                     "time_ids": ids}
    flops_per_image = count_train_flops(unet, map_cond(lambda x: x[:1], cond), autocast=True)
    if args.fp8 == "on":
        speed.convert_fp8(unet, device)
    sharded = args.shard_optimizer == "on"
    optimizer = (ShardedAdamW(list(unet.parameters()), grad_reduce=args.grad_reduce, lr=1e-4) if sharded
                 else torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True))
    ema = EMA(unet, EMAConfig(decay=0.9999, update_every=args.ema_every))
    if args.ema_compile == "on":
        ema.compile()
    calls = 0
    ddp_mode = speed.ddp_compile(args.ddp_compile, args.compile, dist.world_size())
    speed.use_ddp_compile(ddp_mode)
    force_layout = speed.layout_opt(args.layout_opt, args.channels_last == "on", dist.world_size(), ddp_mode)
    # No other name for the DDP module: it must go with `model`, before the process group (see the end)
    wrapped = unet if sharded else dist.wrap_ddp(unet, args.static_graph == "on", args.bucket_cap_mb,
                                                 args.grad_reduce)
    model = speed.compile_model(unet, wrapped, args.compile, force_layout,
                                cuda_graphs=speed.cuda_graphs(args.cuda_graphs, device, args.compile,
                                                              dist.world_size()))
    overlap = args.ema_overlap == "on"
    ema.defer_updates(device)  # its side stream; the step as configured defers with --ema-overlap on only
    ema.deferring = overlap
    x_t = torch.randn(batch, 4, h, h, device=device)  # the trainer's layout: one compiled graph for both
    v_target = torch.randn_like(x_t)
    t = torch.randint(0, 1000, (batch,), device=device)

    ceiling = False  # the ceiling variant: no clipping, no EMA

    def step():
        nonlocal calls
        calls += 1
        ema.launch_pending()  # as the trainer does: the last step's EMA update, if pending, beside this one
        with speed.attention(args.sdpa), torch.autocast("cuda", dtype=torch.bfloat16):
            v_pred = model(x_t, t, **cond).sample
        torch.nn.functional.mse_loss(v_pred.float(), v_target).backward()
        if ceiling:
            if sharded:  # the gradients come through its reduce-scatter (with the norms: a small all-reduce)
                optimizer.reduce_gradients()
            faults.optimizer_step(optimizer, None)  # no clip (and, as every call does, unsets the last one's)
        else:
            total, _ = speed.grad_norms(unet, optimizer)  # as the trainer clips and skips a non-finite step
            ema.settle()
            faults.optimizer_step(optimizer, torch.isfinite(total), speed.clip_divisor(total, 1.0))
        optimizer.zero_grad(set_to_none=True)
        if not ceiling and ema.wants_update(calls):
            ema.update(unet)

    t0 = time.perf_counter()
    for i in range(args.warmup):  # the first steps compile and autotune: their times go to the log
        step()
        if i < 3 and dist.is_main():
            torch.cuda.synchronize()
            print(f"warmup step {i + 1}: {time.perf_counter() - t0:.1f} s since start", flush=True)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0

    def timed(steps: int) -> float:
        """Seconds for `steps` steps (the slowest rank's), the EMA updates of those steps included."""
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ema.settle()  # with --ema-overlap on the last update is still pending
        torch.cuda.synchronize()
        return float(dist.all_gather_tensor(torch.tensor([time.perf_counter() - t0], device=device)).max())

    def set_ceiling(on: bool) -> None:
        nonlocal ceiling
        ceiling = on

    # Variants timed in this process beside the step as configured (the same compiled UNet), name ->
    # switch(on): the ceiling; the other setting of --ema-overlap (ema_inline, the update after the
    # optimizer, or ema_beside_forward, on a side stream as the next step starts); ema_compiled
    # (--ema-compile both), the update through torch.compile.
    variants = {"ceiling": set_ceiling}
    if overlap:
        variants["ema_inline"] = lambda on: setattr(ema, "deferring", not on)
    else:
        variants["ema_beside_forward"] = lambda on: setattr(ema, "deferring", on)
    if args.ema_compile == "both":
        ema.compile()
        ema.probe(unet)  # compiles it here, not in the timed steps
        compiled, ema.fused = ema.fused, None
        variants["ema_compiled"] = lambda on: setattr(ema, "fused", compiled if on else None)
    # Two halves per variant, alternating, so that a drift of the clocks weighs on every variant alike;
    # each half a multiple of --ema-every steps,
    # so that every variant's halves hold the same number of EMA updates.
    half = max(1, round(args.steps / 2 / args.ema_every)) * args.ema_every
    seconds = dict.fromkeys(["", *variants], 0.0)
    peak_bytes = torch.cuda.max_memory_allocated(device)  # of the step as configured, warmup included
    for _ in range(2):
        for name in seconds:
            for other, switch in variants.items():
                switch(other == name)
            torch.cuda.reset_peak_memory_stats(device)
            seconds[name] += timed(half)
            if not name:
                peak_bytes = max(peak_bytes, torch.cuda.max_memory_allocated(device))
    for switch in variants.values():
        switch(False)
    elapsed, timed_steps = seconds.pop(""), 2 * half
    variant_img_per_s = {name: timed_steps * batch * dist.world_size() / t for name, t in seconds.items()}
    peak_mem = peak_bytes / 2**30
    profile = None
    if args.profile:  # after the timed steps, so that they are not slowed down
        profiler = speed.StepProfiler(1, 3, Path(args.work) / f"profile_bare_{res}_{dist.world_size()}",
                                      dist.rank(), device)
        for i in range(1, 5):
            profiler.before_step(i)
            if i < 4:
                step()
        profile = json.loads((profiler.out / "summary_rank0.json").read_text()) if dist.is_main() else None
    peak = matmul_tflops(device)
    world = dist.world_size()
    if dist.is_main():
        img_per_s = timed_steps * batch * world / elapsed
        print("BENCH " + json.dumps({
            "img_per_s": img_per_s, "flops_per_image": flops_per_image, "matmul_tflops": peak,
            "warmup_s": warmup_s, "peak_mem_gib": peak_mem, "card": torch.cuda.get_device_name(),
            "variants": variant_img_per_s,
            **({"profile": profile} if profile else {})}))
    model = wrapped = None  # DDP's reducer goes while its process group lives (freed after it, it can hang)
    dist.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=256, help="px (latents of res / 8)")
    parser.add_argument("--batch", type=int, default=64, help="images per GPU")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each variant, in two halves")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compile, autotuning)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler: 3 steps after the timed ones")
    parser.add_argument("--work", default="/tmp/ldm_ddp_bench", help="--profile: the trace goes under it")
    add_switches(parser)
    bare_worker(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
