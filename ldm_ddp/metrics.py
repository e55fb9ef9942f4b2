"""Training metrics: device-side accumulation, reduction at log time, JSONL, console, wandb, TensorBoard; MFU.

The step only adds detached tensors on the device; the one host sync is `flush()`, once per
log interval, where the sums are reduced across ranks and written by rank 0.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import dist

NUM_T_BUCKETS = 10  # loss per timestep bucket: t in [i*T/10, (i+1)*T/10)
CUDA_PEAK_TFLOPS = 989.0  # H100 and H200 SXM, dense bf16: the MFU denominator on CUDA


def block_group(name: str) -> str:
    """Parameter name -> its block group: 'down_blocks.0.resnets.1.conv1.weight' -> 'down_blocks.0',
    'mid_block.attentions.0.proj_in.weight' -> 'mid_block', 'conv_in.weight' -> 'conv_in'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's CPU flash-attention kernel is not in FlopCounterMode's table:
    q k^T and (.) v, 2 FLOPs a MAC."""
    b, h, s_q, d = q
    return 4 * b * h * s_q * k[2] * d


def _sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_flops(q, k, v)  # dq, dk, dv and d(scores): four matmuls of the forward's size


CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops}


def count_train_flops(unet, cond: dict, autocast: bool) -> float:
    """FLOPs of one UNet forward + backward for one image (cond: the UNet's conditioning kwargs for batch 1),
    counted once with FlopCounterMode.

    Call it before the DDP wrap (its backward would fire DDP's reducer hooks). Model FLOPs, as MFU counts
    them: gradient checkpointing is switched off for the count, so recomputation is not counted as
    useful work.
    """
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    x_t = torch.zeros(1, unet.config.in_channels, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    checkpointing = unet.is_gradient_checkpointing
    if checkpointing:
        unet.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    try:
        with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            unet(x_t, t, **cond).sample.float().mean().backward()
    finally:
        unet.zero_grad(set_to_none=True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return float(counter.get_total_flops())


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line appended to `path`. A last line cut short (a kill or a full disk mid-write) is dropped
    first, so that the new record starts a line of its own instead of being glued to the fragment."""
    with open(path, "a+b") as f:
        end = f.seek(0, 2)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a cut last line (rare: only then is the file read)
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())


def whole_lines(text: str) -> list[str]:
    """The complete, non-empty lines of a JSONL text; a last line being written (or cut) is left out."""
    return [line for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl as one timeline: a line being written (or cut) is left out, and a record
    whose step is not past the previous one starts a later attempt that replaces the records from its step
    on (a folder written before resumes set them aside, or read while a resume does)."""
    records: list[dict] = []
    for record in map(json.loads, whole_lines(path.read_text())):
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append(record)
    return records


def set_aside_records(path: Path, step: int) -> None:
    """On resume at `step` (rank 0): the records an interrupted attempt logged past it move to
    metrics.superseded.jsonl (each with `superseded_at`), so that metrics.jsonl holds one timeline, the one
    this run continues. Rewritten to a temporary file and renamed: a kill meanwhile leaves the old file."""
    if not path.is_file():
        return
    text = path.read_text()
    records = [(line, json.loads(line)) for line in whole_lines(text)]
    kept = [line for line, record in records if record["step"] <= step]
    cut = text and not text.endswith("\n")  # a last line a kill cut short
    if len(kept) == len(records) and not cut:
        return
    for _, record in records:
        if record["step"] > step:
            append_jsonl(path.with_name("metrics.superseded.jsonl"), {**record, "superseded_at": step})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class LossWatch:
    """Notices a run that diverged and did not come back: the logged loss of `patience` log intervals in a row
    at least `ratio` times its lowest mean over `patience` intervals so far (a mean, so that one lucky
    interval sets no bar). A spike the run recovers from within `patience` intervals says nothing; a
    collapsed UNet (the loss stuck high, the gradients near 0) does.
    -> `see` gives the warning once per such stretch (rank 0 prints it)."""

    def __init__(self, ratio: float, patience: int = 5):
        self.ratio, self.patience = ratio, patience
        self.recent: list[tuple[int, float]] = []  # (step, loss) of the last `patience` intervals
        self.best, self.best_step, self.warned = math.inf, 0, False

    def replay(self, records: list[tuple[int, float]]) -> None:
        """(step, loss) of the records before a resume: the lowest mean and the last intervals carry over,
        and a run resumed while its loss stays up is warned about again at its first interval."""
        for step, loss in records:
            self.see(step, loss)
        self.warned = False

    def see(self, step: int, loss: float) -> str | None:
        if not self.ratio or not math.isfinite(loss):
            return None
        self.recent = [*self.recent, (step, loss)][-self.patience:]
        if len(self.recent) < self.patience:
            return None
        mean = sum(x for _, x in self.recent) / self.patience
        if mean < self.best:
            self.best, self.best_step = mean, step
        above = all(x >= self.ratio * self.best for _, x in self.recent)
        warn, self.warned = above and not self.warned, above  # once per stretch above the bar
        if not warn:
            return None
        return (f"warning: the loss has stayed at or above {self.ratio:g}x its lowest for {self.patience} "
                f"log intervals ({loss:.4f} at step {step} against a mean of {self.best:.4f} up to step "
                f"{self.best_step}; since step {self.recent[0][0]}): the run may have diverged. A checkpoint "
                f"from before the rise holds the better state (log.divergence_ratio; 0 = off)")


class Metrics:
    """Accumulates per-step figures between log lines; rank 0 writes them."""

    def __init__(self, out_dir: Path, device: torch.device, num_train_timesteps: int, max_steps: int,
                 images_per_step: int, progress: str, *, wandb_run=None, tensorboard=None,
                 train_flops_per_image: float = 0.0, wandb_checkpoints: str = "off",
                 peak_tflops: float = 0.0, divergence_ratio: float = 0.0):
        self.path = out_dir / "metrics.jsonl"
        self.device, self.T, self.images_per_step = device, num_train_timesteps, images_per_step
        self.wandb_run, self.tensorboard, self.wandb_checkpoints = wandb_run, tensorboard, wandb_checkpoints
        self.flops_per_image = train_flops_per_image
        # MFU's denominator per GPU: dense bf16 of an H100/H200 on CUDA unless given; none on a CPU
        self.peak_tflops = peak_tflops or (CUDA_PEAK_TFLOPS if device.type == "cuda" else 0.0)
        self.group_names, self.bar, self.figure_sum = [], None, {}
        self.watch = LossWatch(divergence_ratio)
        if divergence_ratio and dist.is_main() and self.path.is_file():  # a resumed run: its history so far
            self.watch.replay([(r["step"], r["loss"]) for r in read_records(self.path) if "loss" in r])
        if dist.is_main() and (progress == "bar" or (progress == "auto" and sys.stdout.isatty())):
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True)
        self._reset()

    def _reset(self) -> None:
        zeros = functools.partial(torch.zeros, device=self.device, dtype=torch.float64)
        self.loss_sum, self.grad_norm_sum, self.skipped_sum, self.steps = zeros(()), zeros(()), zeros(()), 0
        self.bucket_sum, self.bucket_count = zeros(NUM_T_BUCKETS), zeros(NUM_T_BUCKETS)
        self.group_sum = zeros(len(self.group_names))
        # The current step's share, added to the sums above by add_step unless the step was skipped.
        self.step_buckets, self.step_groups = zeros(2, NUM_T_BUCKETS), zeros(len(self.group_names))
        # An objective's own figures (e.g. DPO's reward accuracy): name -> [sum, count], kept as the buckets.
        self.figure_sum = {name: zeros(2) for name in self.figure_sum}
        self.step_figures = {name: zeros(2) for name in self.figure_sum}
        self.data_wait_s, self.bad_samples, self.bad_keys = 0.0, 0, []
        self.t0 = time.perf_counter()

    def add_micro_batch(self, loss_per_sample: torch.Tensor, t: torch.Tensor,
                        figures: dict[str, torch.Tensor] | None = None) -> None:
        """Per-sample loss [B] and its timesteps [B], and the objective's per-sample figures [B] by name, on
        the device (no sync). Every rank passes the same figure names."""
        bucket = (t * NUM_T_BUCKETS // self.T).clamp_(max=NUM_T_BUCKETS - 1)
        self.step_buckets[0].index_add_(0, bucket, loss_per_sample.detach().double())
        self.step_buckets[1].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
        for name, values in (figures or {}).items():
            if name not in self.figure_sum:
                self.figure_sum[name] = torch.zeros(2, device=self.device, dtype=torch.float64)
                self.step_figures[name] = torch.zeros_like(self.figure_sum[name])
            count = torch.full((), float(len(values)), device=self.device, dtype=torch.float64)  # no copy
            self.step_figures[name] += torch.stack([values.detach().double().sum(), count])

    @torch.no_grad()
    def add_grad_norms(self, module: torch.nn.Module, norms: list[torch.Tensor] | None = None) -> None:
        """Gradient norm per block group (block_group of the parameter names), before clipping; on the device.

        `norms`: the per-parameter gradient norms, in parameter order, when the caller has them already
        (speed.grad_norms); else one torch._foreach_norm here. Then a scatter of the squares into their
        groups: no host sync. Every rank holds the same all-reduced gradients.
        """
        if not self.group_names:
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            self.group_names = list(dict.fromkeys(block_group(n) for n, _ in named))
            self._grad_params = [p for _, p in named]
            self._group_index = torch.tensor([self.group_names.index(block_group(n)) for n, _ in named],
                                             device=self.device)
            self.group_sum = torch.zeros(len(self.group_names), device=self.device, dtype=torch.float64)
            self.step_groups = torch.zeros_like(self.group_sum)
        present = [(p.grad, i) for i, p in enumerate(self._grad_params) if p.grad is not None]
        if norms is None:
            norms = torch._foreach_norm([g for g, _ in present]) if present else []
        if not norms:
            return
        # one norm per parameter (a ShardedAdamW's: a missing gradient counts as zero), or per present one
        index = self._group_index if len(norms) == len(self._grad_params) else self._group_index[
            torch.tensor([i for _, i in present], device=self.device)]
        squares = torch.stack(norms).double().square()
        group_sq = torch.zeros(len(self.group_names), device=self.device, dtype=torch.float64)
        self.step_groups = group_sq.index_add_(0, index.to(squares.device), squares).sqrt()

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, data_wait_s: float,
                 bad: list[tuple[str, str]], skipped: torch.Tensor | bool = False) -> None:
        """One optimizer step; `skipped` (a device bool or a Python bool) counts a step the optimizer did not
        take. A skipped step adds nothing to the loss by timestep and the per-block norms either (its
        micro-batches' and gradients' share is dropped on the device), as the loop passes it 0 loss and grad
        norm: every mean of a record is over the steps taken."""
        taken = (~skipped).double() if isinstance(skipped, torch.Tensor) else float(not skipped)
        self.bucket_sum += taken * self.step_buckets[0].nan_to_num(0, 0, 0)
        self.bucket_count += taken * self.step_buckets[1]
        self.group_sum += taken * self.step_groups.nan_to_num(0, 0, 0)  # 0 * NaN would be NaN
        self.step_buckets.zero_()
        self.step_groups.zero_()
        for name, step_share in self.step_figures.items():
            self.figure_sum[name] += taken * step_share.nan_to_num(0, 0, 0)
            step_share.zero_()
        self.loss_sum += loss.detach()
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm.detach()
        self.skipped_sum += skipped
        self.steps += 1
        self.data_wait_s += data_wait_s
        self.bad_samples += len(bad)
        self.bad_keys += [f"{key} ({reason})" for key, reason in bad[:1]]  # one example for the log line
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, lr: float, extra: dict | None = None) -> dict | None:
        """Reduce across ranks (a collective: every rank calls it) and write one record on rank 0."""
        if self.steps == 0:
            return None
        elapsed = time.perf_counter() - self.t0
        host = torch.tensor([float(self.bad_samples), self.data_wait_s], device=self.device,
                            dtype=torch.float64)
        names = sorted(self.figure_sum)
        sums = torch.cat([torch.stack([self.loss_sum, self.grad_norm_sum, self.skipped_sum]), host,
                          self.bucket_sum, self.bucket_count, self.group_sum,
                          *(self.figure_sum[n] for n in names)])
        sums = dist.all_reduce_sum(sums).tolist()  # the one host sync of the interval
        figures = {n: s / c if c else None for n, s, c in zip(names, sums[-2 * len(names)::2],
                                                              sums[-2 * len(names) + 1::2])} if names else {}
        world, n = dist.world_size(), self.steps * dist.world_size()
        buckets = sums[5:5 + 2 * NUM_T_BUCKETS]
        img_per_s = self.steps * self.images_per_step / elapsed
        taken = max(1.0, n - sums[2])  # skipped steps add 0 to the loss and norm sums:
        # means over the steps taken
        record = {
            "step": step, "loss": sums[0] / taken, "lr": lr, "grad_norm": sums[1] / taken,
            "grad_norm_by_block": {g: s / taken
                                   for g, s in zip(self.group_names, sums[5 + 2 * NUM_T_BUCKETS:])},
            **figures,
            "img_per_s": img_per_s, "img_per_s_per_gpu": img_per_s / world,
            "data_wait_share": sums[4] / world / elapsed,
            "skipped_steps": round(sums[2] / world),  # every rank skips the same steps
            "bad_samples": round(sums[3]),
            "loss_by_t": [s / c if c else None
                          for s, c in zip(buckets[:NUM_T_BUCKETS], buckets[NUM_T_BUCKETS:])],
            "time": time.time(), **(extra or {}),
        }
        if self.flops_per_image:  # achieved model FLOP/s per GPU; MFU against the configured (or CUDA) peak
            record["tflops_per_gpu"] = self.flops_per_image * img_per_s / world / 1e12
            if self.peak_tflops:
                record["mfu"] = record["tflops_per_gpu"] / self.peak_tflops
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record.update(compile_figures())
        warning = self.watch.see(step, record["loss"])
        if dist.is_main():
            self._write(record)
            if warning:
                self._say(warning)
        self._reset()
        return record

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _write(self, record: dict) -> None:
        append_jsonl(self.path, record)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
        self._say(summary_line(record, self.bad_keys))
        scalars = flat_scalars(record)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def log_image(self, step: int, path: Path, caption: str) -> None:
        if not dist.is_main():
            return
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({"samples": wandb.Image(str(path), caption=caption)}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image
            with Image.open(path) as image:
                self.tensorboard.add_image("samples", np.asarray(image.convert("RGB")), step,
                                           dataformats="HWC")
            self.tensorboard.flush()

    def log_checkpoint(self, path: Path, step: int) -> None:
        """A committed checkpoint as a wandb artifact (log.wandb_checkpoints):
        a file:// reference or an upload.

        An upload copies the file into wandb's staging folder before returning (then uploads in the
        background), so a pruned checkpoint is still sent; a reference records the path and checksum only.
        """
        if self.wandb_run is None or self.wandb_checkpoints == "off" or not dist.is_main():
            return
        try:
            import wandb
            artifact = wandb.Artifact(f"checkpoints-{self.wandb_run.id}", type="model",
                                      metadata={"step": step})
            if self.wandb_checkpoints == "reference":
                artifact.add_reference(Path(path).resolve().as_uri(), name=Path(path).name)
            else:
                artifact.add_file(str(path), name=Path(path).name)
            self.wandb_run.log_artifact(artifact, aliases=[f"step_{step}", "latest"])
        except Exception as err:  # any failure: tracking never stops the run
            print(f"warning: wandb checkpoint artifact failed ({type(err).__name__}: {str(err)[:100]})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None and dist.is_main():
            self.wandb_run.finish()


def compile_figures() -> dict:
    """Graphs torch.compile made in this process so far and the seconds it spent on them (one per
    aspect-ratio bucket and the start-up probe's); {} when nothing was compiled."""
    if "torch._dynamo" not in sys.modules:  # never imported: nothing compiled (and no import cost)
        return {}
    from torch._dynamo import utils
    graphs = utils.counters["stats"]["unique_graphs"]
    if not graphs:
        return {}
    return {"compiled_graphs": graphs,
            "compile_s": round(utils.calculate_time_spent().get("entire_frame_compile", 0.0), 1)}


def summary_line(record: dict, bad_keys: list[str] = ()) -> str:
    """The console line of one record: loss, lr, grad norm
    (and its largest block), throughput, MFU, upkeep."""
    line = (f"step {record['step']:>7d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"grad {record['grad_norm']:.3f}")
    if record.get("grad_norm_by_block"):
        top = max(record["grad_norm_by_block"].items(), key=lambda kv: kv[1])
        line += f" (max {top[0]} {top[1]:.3f})"
    line += f"  {record['img_per_s']:.1f} img/s ({record['img_per_s_per_gpu']:.1f}/GPU)"
    if "tflops_per_gpu" in record:
        line += f"  {record['tflops_per_gpu']:.3g} TFLOP/s/GPU"
    if "mfu" in record:
        line += f"  MFU {100 * record['mfu']:.1f}%"
    line += f"  data-wait {100 * record['data_wait_share']:.0f}%"
    if "peak_mem_gib" in record:
        line += f"  mem {record['peak_mem_gib']:.1f} GiB"
    if "val_loss" in record:
        line += f"  val {record['val_loss']:.4f} ({record['val_s']:.1f} s)"
    if record.get("dpo_reward_accuracy") is not None:  # Diffusion-DPO's implicit reward (objectives.py)
        line += (f"  reward acc {record['dpo_reward_accuracy']:.2f} margin {record['dpo_reward_margin']:.3g}"
                 f" model-ref {record['dpo_model_minus_reference']:.3g}")
    line += f"  skipped {record.get('skipped_steps', 0)}  bad {record['bad_samples']}"
    if record["bad_samples"] and bad_keys:
        line += f" (e.g. {bad_keys[0]}; each in bad_samples.jsonl at the next save)"
    return line


def flat_scalars(record: dict) -> dict[str, float]:
    """A record's numbers for wandb / TensorBoard: loss_t<i> per timestep bucket, grad_norm/<block group>."""
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
    for series in ("loss_by_t", "val_loss_by_t"):  # loss_t<i>, val_loss_t<i>
        scalars.update({f"{series[:-5]}_t{i}": v for i, v in enumerate(record.get(series, []))
                        if v is not None})
    scalars.update({f"grad_norm/{g}": v for g, v in record.get("grad_norm_by_block", {}).items()})
    return scalars


def start_tensorboard(enabled: bool, out_dir: Path, start_step: int = 0, config_toml: str = ""):
    """A SummaryWriter on <out_dir>/tensorboard (rank 0 only), or None; a missing package is one warning line.

    purge_step hides, in TensorBoard, what an earlier attempt logged past the step this run resumes from.
    """
    if not enabled or not dist.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: log.tensorboard is set but tensorboard is not installed "
              '(pip install -e ".[tensorboard]"); logging to metrics.jsonl only')
        return None
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    if config_toml:
        writer.add_text("config", "```\n" + config_toml + "\n```", start_step)
    return writer


def start_wandb(mode: str, out_dir: Path, config: dict):
    """A wandb run (rank 0 only) that continues after a restart, or None; never blocks on the network. Project
    and run name come from WANDB_PROJECT / WANDB_NAME (default: ldm_ddp / the run folder's name), its files go
    to WANDB_DIR (default: the run folder)."""
    if mode == "disabled" or not dist.is_main():
        return None
    try:
        import wandb
    except ImportError:
        print("warning: log.wandb is set but wandb is not installed; logging to metrics.jsonl only")
        return None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    project, name = os.environ.get("WANDB_PROJECT", "ldm_ddp"), os.environ.get("WANDB_NAME", out_dir.name)
    for attempt_mode in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            settings = wandb.Settings(init_timeout=30, silent=True)
            return wandb.init(project=project, name=name, id=run_id, resume="allow", mode=attempt_mode,
                              dir=os.environ.get("WANDB_DIR", str(out_dir)), config=config, settings=settings)
        except Exception as err:  # any failure (network down, auth missing): fall back, never stop the run
            then = "; logging offline instead" if attempt_mode == "online" else ""
            print(f"warning: wandb {attempt_mode} failed ({type(err).__name__}: {str(err)[:100]}){then}")
    return None
