"""The GPU fast path's switches: the SDPA backend, torch.compile of the UNet (whole or by block), cuDNN
autotuning, a probe at start that makes a failing switch say so before the first step (falling back only
when asked), and a profiler for a few steps of a real run.

Compilation is lazy in torch: a missing compiler or an unsupported kernel would otherwise surface inside
the first training step, or never clearly. The probe runs one forward and backward on a dummy batch,
with the run's autocast and attention backend, then drops its gradients: weights, optimizer and EMA are
untouched, and the step timings that follow exclude compilation.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import dist
from .config import ConfigError, resolve_batch
from .models import trains_channels_last
from .sharded_adamw import ShardedAdamW


def attention(backend: str):
    """A fresh context selecting the SDPA kernel for one forward ("auto": PyTorch's own choice)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kernels[backend]])


def configure_cuda(cudnn_benchmark: bool) -> None:
    """cuDNN autotuning: each convolution shape is timed once against cuDNN's algorithms and the fastest kept.
    The UNet's shapes are fixed for a run, so the search is paid in the first steps only."""
    torch.backends.cudnn.benchmark = cudnn_benchmark


@torch.no_grad()
def grad_norms(module: torch.nn.Module, optimizer=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global gradient norm (torch.nn.utils.clip_grad_norm_'s arithmetic) and the per-parameter norms
    (parameter order, parameters without gradients left out), so the per-block metrics need no second pass.
    A ShardedAdamW reduce-scatters the gradients first and gives the norms of the mean gradients.
    -> (total norm, per-parameter norms), on the device, no host sync."""
    if isinstance(optimizer, ShardedAdamW):
        return optimizer.reduce_gradients()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(()), []
    norms = list(torch._foreach_norm(grads))
    return torch.linalg.vector_norm(torch.stack(norms)), norms


def clip_divisor(total: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """What the gradients are divided by to clip their global norm `total` to max_norm: max(1, (total +
    1e-6) / max_norm), the reciprocal of clip_grad_norm_'s factor (exactly 1 when no clip is needed); None for
    max_norm 0 (no clip). faults.optimizer_step hands it to fused AdamW, which divides each gradient as it
    reads it (its `grad_scale` input), instead of a pass of its own over every gradient before the step."""
    if not max_norm:
        return None
    return torch.clamp((total + 1e-6) / max_norm, min=1.0)


def compile_mode(setting: str, device: torch.device) -> str:
    """train.compile -> the mode used: "auto" is "full" on CUDA (measured fastest: docs/performance.md) and
    "off" elsewhere (inductor's CPU code gains little for the demo's small UNet
    and costs minutes to compile)."""
    if setting == "auto":
        return "full" if device.type == "cuda" else "off"
    return setting


def unet_blocks(unet) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def regions(unet) -> list[torch.nn.Module]:
    """The repeated modules regional compilation compiles one by one: every ResNet block, transformer,
    down- and upsampler inside the down/mid/up blocks (a block without such children counts as one)."""
    found = []
    for block in unet_blocks(unet):
        parts = [m for name in ("resnets", "attentions", "downsamplers", "upsamplers")
                 for m in (getattr(block, name, None) or [])]
        found += parts or [block]
    return found


def layout_opt(setting: str, channels_last: bool, world_size: int, ddp_mode: str = "split") -> bool:
    """train.layout_opt -> whether compile_model forces inductor's layout optimization: only for channels-last
    weights; "auto" is on where the UNet compiles as one graph (one process, or DDP with train.ddp_compile
    whole: measured +1.8% on one H200) and off for DDP's split graphs (there measured once, with 100 MB
    buckets, worse: docs/performance.md)."""
    whole_graph = world_size == 1 or ddp_mode != "split"
    return channels_last and (setting == "on" or (setting == "auto" and whole_graph))


# train.ddp_compile -> torch._dynamo.config.optimize_ddp (read when dynamo compiles the DDP-wrapped model)
DDP_COMPILE = {"split": "ddp_optimizer", "whole": "no_optimization"}


def ddp_compile(setting: str, compile_mode: str, world_size: int) -> str:
    """train.ddp_compile -> the mode in effect: the setting where the whole UNet is compiled under DDP, else
    "split" (torch's default; with one process or without train.compile=full there is nothing to decide).

    split: dynamo cuts the graph at every DDP bucket (DDPOptimizer) so that each bucket's all-reduce starts
    while the backward goes on, at the price of fusion and layout across the cuts (SD1.5: ~136 graphs at
    25 MB).
    whole: one graph, as on one GPU; DDP's reducer all-reduces the gradients after the backward (3.4 GB of
    fp32 for SD1.5, not overlapped with the backward). Measured on H200s at 256 px, batch 64: whole scales
    94.8% on 2 GPUs and 89.6-90.3% on 4, split 80.6% on 2 at 25 MB buckets and 70.4% on 4 at 800 MB
    (docs/performance.md). A third way, DDP's Python reducer traced into the backward by compiled
    autograd (optimize_ddp="python_reducer"), measured 1.4% slower than whole and compiled 60% longer."""
    return setting if compile_mode == "full" and world_size > 1 else "split"


def use_ddp_compile(mode: str) -> None:
    """Set the process's DDP compile mode (a dynamo setting) before the model is compiled."""
    torch._dynamo.config.optimize_ddp = DDP_COMPILE[mode]


def compile_model(unet, model: torch.nn.Module, mode: str, force_layout: bool = False,
                  backend: str = "inductor", shapes: int = 1, cuda_graphs: bool = False) -> torch.nn.Module:
    """-> the module the step calls. "full": torch.compile of the (DDP-wrapped) model, as one graph or split
    at DDP's buckets as `use_ddp_compile` set (train.ddp_compile). "regional": each
    repeated module (`regions`) compiled in place with static shapes; modules of one class and one shape
    share one compiled graph (SD1.5: 38 ResNet blocks and transformers, 18 distinct shapes), so compilation
    is shorter than the whole UNet's, and nn.Module.compile keeps parameter names (checkpoints and the
    sampling copy are unaffected). "off": the model as it is.

    `force_layout` (weights already channels-last; `layout_opt`): inductor keeps the graph's activations and
    gradients channels-last too. Its own heuristic turns that off for any graph with a 3x3 convolution of at
    most half as many output as input channels (SD's up blocks: 2560 -> 1280), and then every convolution's
    backward copies its incoming gradient into channels-last first (SD1.5, 256 px, batch 64: ~95 copies a
    step; forcing the layout measured 535.0 against 525.6 img/s on an H200, docs/performance.md).

    `cuda_graphs` ("full" only): inductor records the compiled forward and backward as CUDA graphs
    (cudagraph trees) and replays them, one launch each instead of one per kernel (SD1.5 at 256 px: ~3,500
    kernels a step, which took the host longer to launch than the GPU to run), so the host no longer paces
    the GPU. Inputs are copied into the graphs' own buffers; outputs, gradients included, live in the
    graphs' memory pool until the next step's replay overwrites them."""
    if mode == "full":  # the layout is measured for the whole graph only; the option covers its backward too
        options = {**({"force_layout_optimization": True} if force_layout else {}),
                   **({"triton.cudagraphs": True} if cuda_graphs else {})}
        inductor = {"options": options} if options and backend == "inductor" else {}  # inductor's own options
        if shapes == 1:
            return torch.compile(model, backend=backend, **inductor)
        # Several shapes (buckets): one static graph each, not dynamo's switch to a shape-generic graph at
        # the second shape; the limit admits them all (and the probe's).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 2)
        return torch.compile(model, backend=backend, dynamic=False, **inductor)
    if mode == "regional":
        # One recompilation per distinct shape of a class: SD1.5's ResNet blocks alone have 14.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64 * shapes)
        for region in regions(unet):
            region.compile(dynamic=False, backend=backend)
    return model


def compile_vae_encoder(vae, device: torch.device, setting: str, batch: int, size: tuple[int, int],
                        shapes: int = 1) -> bool:
    """train.compile_vae (auto | on | off; auto: on on CUDA) -> whether the frozen VAE's encoder, which
    encodes every online batch, now runs compiled: in place (nn.Module.compile keeps parameter names), one
    static graph per input shape (aspect-ratio buckets); channels-last weights on CUDA, as the UNet's. The
    decoder (live samples) stays eager. A probe encodes a zero micro-batch of `batch` images of `size`
    (width, height) px first, so that a compile error shows now: auto then warns and goes on eager, on stops
    with one line."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):  # on a CPU it costs more than saves
        return False
    if device.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 2)
    vae.encoder.compile(dynamic=False, backend=COMPILE_BACKEND)

    def encode_zeros() -> None:  # the input as the trainer's encode gives it: contiguous, the VAE's dtype
        with torch.no_grad():
            vae.encoder(torch.zeros(batch, 3, size[1], size[0], dtype=vae.dtype, device=device))

    return probe(encode_zeros, "train.compile_vae", setting == "auto",
                 lambda: uncompile_in_place(vae.encoder), "train.compile_vae")


def compile_text_encoders(frozen) -> None:
    """train.compile_text_encoder: the frozen text encoder(s), which encode every batch's captions (from the
    latent cache too), compiled in place; one static graph per batch size (training's, sampling's: within
    dynamo's default recompile limit)."""
    for encoder in (frozen.text_encoder, frozen.text_encoder_2):
        if encoder is not None:
            encoder.compile(dynamic=False, backend=COMPILE_BACKEND)


def uncompile_in_place(module: torch.nn.Module) -> None:
    """Undo nn.Module.compile: the module runs eager again."""
    module._compiled_call_impl = None  # what nn.Module.compile sets


def uncompile(unet, model: torch.nn.Module) -> torch.nn.Module:
    """Undo compile_model: the eager module (for a fallback)."""
    for region in regions(unet):
        uncompile_in_place(region)
    return getattr(model, "_orig_mod", model)


def probe(step: Callable[[], None], what: str, fallback: bool, undo: Callable[[], None],
          setting: str = "train.compile") -> bool:
    """Run `step` once; -> True if it worked. On failure: ConfigError (one line), or with `fallback` a
    warning (naming `setting`=auto, which allows it), `undo()`, and False."""
    try:
        step()
        return True
    except Exception as err:  # a compiler error, a missing kernel: any of them means the switch does not work
        message = f"{what} failed at start ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        if not fallback:
            raise ConfigError(f"{message}; set {setting}=auto (falls back to eager) or off") from None
        print(f"warning: {message}; continuing without it ({setting}=auto)", flush=True)
        undo()
        return False


# torch.compile's backend in the trainer. LDM_DDP_COMPILE_BACKEND=aot_eager (dynamo's capture and AOT autograd
# without inductor's kernels) or eager (the capture alone) help to debug a compile;
# the CPU tests use aot_eager.
COMPILE_BACKEND = os.environ.get("LDM_DDP_COMPILE_BACKEND", "inductor")


def cuda_graphs(setting: str, device: torch.device, mode: str, world_size: int, grad_accum: int = 1,
                shapes: int = 1) -> bool:
    """train.cuda_graphs -> whether the compiled UNet runs as CUDA graphs (compile_model). Only where it is
    compiled whole ("full") on CUDA, and only with one micro-batch per step (a second micro-batch's replay
    would overwrite the gradients the first left in the graphs' pool). auto: on where it was measured, one
    GPU and one input shape (square images: data.buckets=off); measured with the diffusion objective, SD1.5
    at 256 px from the latent cache (1 x H200: 540 img/s, docs/performance.md). on: also under DDP and with
    buckets (a graph each), not measured there. Asked for by name where it cannot run, it warns (no CUDA,
    not compiled whole by inductor) or stops (accumulation)."""
    if setting == "off":
        return False
    if device.type != "cuda" or mode != "full" or COMPILE_BACKEND != "inductor":
        if setting == "on" and dist.is_main():
            print(f"warning: train.cuda_graphs=on needs train.compile=full with inductor on CUDA (here "
                  f"{mode} with {COMPILE_BACKEND} on {device.type}); running without CUDA graphs", flush=True)
        return False
    if grad_accum > 1:
        if setting == "on":
            raise ConfigError(f"train.cuda_graphs=on: needs one micro-batch per step, this run accumulates "
                              f"{grad_accum} (train.global_batch / (data.batch_per_gpu x GPUs))")
        return False
    return setting == "on" or (world_size == 1 and shapes == 1)


def fp8_linear(module: torch.nn.Module, name: str) -> bool:
    """Which linears train.fp8 converts: those inside the UNet's transformer blocks (attention q/k/v/out,
    the cross-attention's query and output, the feed-forward's two), with both sizes multiples of 16 (FP8
    matmuls need them). Left in bf16: the cross-attention's keys and values (77 text tokens a sample: small
    matmuls whose weight gradient would need the batch's token count a multiple of 16), the time and
    conditioning embeddings (a batch's few rows), LoRA's adapters (model.lora_rank: too narrow; the frozen
    layers they wrap are converted)."""
    return (isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{name}."
            and ".lora_" not in name and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and not name.endswith(("attn2.to_k", "attn2.to_v")))


def convert_fp8(unet: torch.nn.Module, device: torch.device, emulate: bool = False) -> int:
    """train.fp8: torchao's float8 training (dynamic tensorwise scales: inputs and weights in e4m3, output
    gradients in e5m2; inner sizes padded to 16, so any batch and bucket shape runs) for the linears
    `fp8_linear` picks, in place, before the compile and the DDP wrap.
    The modules keep their parameters (the same tensors, so the optimizer and the EMA are unaffected) and
    their names: checkpoints hold the same fp32 weights. `emulate`: torchao's emulation of the FP8 matmul
    (CPU tests). -> how many linears were converted; ConfigError without torchao or FP8 matmuls."""
    if not emulate:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ConfigError(f"train.fp8: needs a GPU with FP8 matmuls (compute capability 8.9+: Ada, "
                              f"Hopper or newer), this run has {where}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8: needs torchao (pip install torchao, or the fp8 extra)") from None
    picked = [name for name, module in unet.named_modules() if fp8_linear(module, name)]
    convert_to_float8_training(unet, config=Float8LinearConfig(emulate=emulate, pad_inner_dim=True),
                               module_filter_fn=fp8_linear)
    return len(picked)


def prepare_unet(unet, cfg, device: torch.device, world_size: int, uncond: dict, autocast: bool, objective,
                 shapes: int = 1):
    """The trainer's fast path, set up and probed: cuDNN autotuning on CUDA (where models.build_unet made the
    weights channels-last), the DDP wrap, torch.compile (train.compile). -> the module the step calls.

    Under DDP the compiled UNet is one graph and DDP all-reduces after the backward ("whole", measured faster
    than dynamo's per-bucket split: ddp_compile). The probe runs one forward and backward of a micro-batch's
    shape so a compile error shows before step 1; with train.compile=auto (not asked for by name) a failure
    warns and the run goes on eager, with full (or regional) it stops with one line.

    `shapes`: how many input shapes the step will see (aspect-ratio buckets). Each is compiled on first use
    into a graph of its own, static (dynamic=False: no shape-generic kernels), up to that many. The frozen
    model the `objective` runs (Diffusion-DPO's reference) is compiled with "full", probed and falls back with
    the UNet."""
    if device.type == "cuda":
        configure_cuda(cudnn_benchmark=True)
    if cfg.train.fp8:
        converted = convert_fp8(unet, device)
        if dist.is_main():
            print(f"train.fp8: {converted} linears of the UNet train in float8", flush=True)
    channels_last = trains_channels_last(device)  # the weights are already (models.build_unet)
    mode = compile_mode(cfg.train.compile, device)
    graphs = cuda_graphs(cfg.train.cuda_graphs, device, mode, world_size, resolve_batch(cfg, world_size)[0],
                         shapes)
    use_ddp_compile(ddp_compile("whole", mode, world_size))
    # train.shard_optimizer: the optimizer reduces the gradients itself (sharded_adamw.py)
    sharded = cfg.train.shard_optimizer == "on"
    wrapped = unet if sharded else dist.wrap_ddp(unet, grad_reduce=cfg.train.grad_reduce)
    model = compile_model(unet, wrapped, mode, force_layout=channels_last, backend=COMPILE_BACKEND,
                          shapes=shapes, cuda_graphs=graphs)
    reference = objective.reference
    if reference is not None and mode == "full":
        # A graph per shape beside the UNet's, counted against the same recompile limit (one forward's code).
        # Not regional: that compiles in place, and the live samples draw with the reference.
        objective.run_reference = compile_model(reference, reference, mode, force_layout=channels_last,
                                                backend=COMPILE_BACKEND, shapes=2 * shapes)
    if mode == "off":
        return model

    def probe_step() -> None:  # gradients dropped: weights, optimizer and EMA untouched
        b = len(uncond["encoder_hidden_states"])  # a micro-batch's images (pairs: both images)
        c, h = unet.config.in_channels, unet.config.sample_size
        x_t, t = torch.zeros(b, c, h, h, device=device), torch.zeros(b, dtype=torch.long, device=device)
        # CUDA graphs: the first call warms up, the second records the graphs, the third replays them
        for _ in range(3 if graphs else 1):
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    model(x_t, t, **uncond).sample.sum().backward()
                    if reference is not None:
                        with torch.no_grad():
                            objective.run_reference(x_t, t, **uncond)
            finally:
                unet.zero_grad(set_to_none=True)

    what = f"train.compile={mode}" + (" with train.cuda_graphs" if graphs else "")
    if not probe(probe_step, what, cfg.train.compile == "auto", lambda: None):
        model = uncompile(unet, model)
        if reference is not None:
            objective.run_reference = uncompile(reference, objective.run_reference)
        if graphs:  # the graphs' memory pool, held by the recorded graphs, goes with them
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return model


class StepProfiler:
    """torch.profiler over optimizer steps [at, at + steps) of a run (log.profile_at): a Chrome trace, the
    op table by device time (also split by input shapes), on CUDA the host ops behind the costliest kernels
    (kernel_sources), and a summary of how busy the device was, in `out`/ (one set per rank)."""

    def __init__(self, at: int, steps: int, out: Path, rank: int, device: torch.device):
        self.at, self.end, self.out, self.rank, self.device = at, at + steps, out, rank, device
        self.prof, self.t0 = None, 0.0

    def before_step(self, step: int) -> None:
        """Call before computing step `step` + 1 (the loop's counter before it increments)."""
        if self.at and step == self.at and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and step == self.end:
            self.finish(step - self.at)

    def close(self, step: int) -> None:
        """The run ended at `step`: a record still open is written with the steps it has."""
        if self.prof is not None:
            self.finish(step - self.at)

    def finish(self, steps: int) -> dict:
        """Stop, write trace, table and summary; -> the summary."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events, self.prof = self.prof, None
        self.out.mkdir(parents=True, exist_ok=True)
        events.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        averages = events.key_averages()
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.out / f"ops_rank{self.rank}.txt").write_text(averages.table(sort_by=key, row_limit=60))
        by_shape = events.key_averages(group_by_input_shape=True)  # which tensors the top ops ran on
        (self.out / f"ops_by_shape_rank{self.rank}.txt").write_text(by_shape.table(sort_by=key, row_limit=60))
        trace = json.loads((self.out / f"trace_rank{self.rank}.json").read_text())
        busy_us = device_busy_us(trace)
        if self.device.type == "cuda":  # the host op chain behind the kernels that took the most device time
            try:
                rows = [f"{n:6d} {t / 1e3 / max(steps, 1):9.3f} ms/step  {chain or '(no host op)'}"
                        f"  ||  {name[:100]}"
                        for chain, name, n, t in kernel_sources(trace)[:60]]
                (self.out / f"kernels_rank{self.rank}.txt").write_text("\n".join(rows) + "\n")
            except (KeyError, TypeError, ValueError) as err:  # a trace of another shape: the run goes on
                print(f"warning: profile: kernel sources not written ({type(err).__name__}: {err})",
                      flush=True)
        summary = {"steps": steps, "wall_ms_per_step": 1e3 * wall / max(steps, 1),
                   "device_busy_ms_per_step": busy_us / 1e3 / max(steps, 1)}
        summary["device_busy_share"] = summary["device_busy_ms_per_step"] / summary["wall_ms_per_step"]
        (self.out / f"summary_rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
        if self.rank == 0:
            print(f"profile: {steps} steps, {summary['wall_ms_per_step']:.1f} ms/step wall, device busy "
                  f"{summary['device_busy_share']:.1%} -> {self.out}", flush=True)
        return summary


def kernel_sources(trace: dict, depth: int = 4) -> list[tuple[str, str, int, float]]:
    """Which host ops launched the GPU kernels of a Chrome trace: each kernel is matched to its launch (the
    runtime call with the same correlation id) and to the innermost `depth` CPU ops open around that launch on
    its thread. -> (op chain, kernel name, count, total microseconds), most device time first. This is how the
    conv backward's gradient copies were found (docs/performance.md); the op table alone says aten::copy_."""
    events = trace.get("traceEvents", [])
    by_thread: dict = {}  # tid -> its CPU ops and kernel launches
    for e in events:
        if "dur" in e and (e.get("cat") == "cpu_op" or (e.get("cat") == "cuda_runtime"
                                                         and "correlation" in e.get("args", {}))):
            by_thread.setdefault(e["tid"], []).append(e)
    chains = {}  # correlation id -> the op chain around its launch
    for found in by_thread.values():
        open_ops: list = []  # nested, outermost first
        for e in sorted(found, key=lambda e: (e["ts"], -e["dur"])):  # an op before the ops
            # and launches inside
            while open_ops and open_ops[-1]["ts"] + open_ops[-1]["dur"] < e["ts"]:
                open_ops.pop()
            if e["cat"] == "cpu_op":
                open_ops.append(e)
            else:
                chains[e["args"]["correlation"]] = " > ".join(op["name"] for op in open_ops[-depth:])
    totals: dict = {}
    for kernel in events:
        if kernel.get("cat") == "kernel" and "dur" in kernel:
            key = (chains.get(kernel.get("args", {}).get("correlation"), ""), kernel["name"])
            count, total = totals.get(key, (0, 0.0))
            totals[key] = (count + 1, total + kernel["dur"])
    return sorted(((chain, name, n, t) for (chain, name), (n, t) in totals.items()), key=lambda row: -row[3])


def device_busy_us(trace: dict) -> float:
    """Microseconds during which at least one kernel, copy or memset ran, from a Chrome trace (overlaps
    merged: NCCL kernels running beside compute count once)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace.get("traceEvents", [])
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy
