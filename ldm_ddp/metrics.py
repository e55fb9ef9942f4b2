"""Training metrics: device-side accumulation, reduction at log time, JSONL, console, wandb.

The step only adds detached tensors on the device; the one host sync is `flush()`, once per
log interval, where the sums are reduced across ranks and written by rank 0.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch

from . import dist

NUM_T_BUCKETS = 10  # loss per timestep bucket: t in [i*T/10, (i+1)*T/10)


class Metrics:
    """Accumulates per-step figures between log lines; rank 0 writes them."""

    def __init__(self, out_dir: Path, device: torch.device, num_train_timesteps: int, max_steps: int,
                 images_per_step: int, progress: str, wandb_run=None):
        self.path = out_dir / "metrics.jsonl"
        self.device, self.T, self.images_per_step = device, num_train_timesteps, images_per_step
        self.wandb_run = wandb_run
        self.bar = None
        if dist.is_main() and (progress == "bar" or (progress == "auto" and sys.stdout.isatty())):
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True)
        self._reset()

    def _reset(self) -> None:
        zeros = lambda n: torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        self.loss_sum, self.grad_norm_sum, self.steps = zeros(()), zeros(()), 0
        self.bucket_sum, self.bucket_count = zeros(NUM_T_BUCKETS), zeros(NUM_T_BUCKETS)
        self.data_wait_s, self.bad_samples, self.bad_keys = 0.0, 0, []
        self.t0 = time.perf_counter()

    def add_micro_batch(self, loss_per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """Per-sample loss [B] and its timesteps [B], on the device (no sync)."""
        bucket = (t * NUM_T_BUCKETS // self.T).clamp_(max=NUM_T_BUCKETS - 1)
        self.bucket_sum.index_add_(0, bucket, loss_per_sample.detach().double())
        self.bucket_count.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, data_wait_s: float,
                 bad: list[str]) -> None:
        self.loss_sum += loss.detach()
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm.detach()
        self.steps += 1
        self.data_wait_s += data_wait_s
        self.bad_samples += len(bad)
        self.bad_keys += bad[:8]
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int, lr: float, extra: dict | None = None) -> dict | None:
        """Reduce across ranks (a collective: every rank calls it) and write one record on rank 0."""
        if self.steps == 0:
            return None
        elapsed = time.perf_counter() - self.t0
        sums = torch.stack([self.loss_sum, self.grad_norm_sum,
                            torch.tensor(float(self.bad_samples), device=self.device, dtype=torch.float64),
                            torch.tensor(self.data_wait_s, device=self.device, dtype=torch.float64)])
        buckets = torch.cat([self.bucket_sum, self.bucket_count])
        sums, buckets = dist.all_reduce_sum(sums).tolist(), dist.all_reduce_sum(buckets).tolist()
        world = dist.world_size()
        record = {
            "step": step, "loss": sums[0] / (self.steps * world), "lr": lr,
            "grad_norm": sums[1] / (self.steps * world),
            "img_per_s": self.steps * self.images_per_step / elapsed,
            "img_per_s_per_gpu": self.steps * self.images_per_step / elapsed / world,
            "data_wait_share": sums[3] / world / elapsed, "bad_samples": int(sums[2]),
            "loss_by_t": [s / c if c else None for s, c in zip(buckets[:NUM_T_BUCKETS], buckets[NUM_T_BUCKETS:])],
            "time": time.time(), **(extra or {}),
        }
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if dist.is_main():
            self._write(record)
        self._reset()
        return record

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = (f"step {record['step']:>7d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad {record['grad_norm']:.3f}  {record['img_per_s']:.1f} img/s  "
                f"data-wait {100 * record['data_wait_share']:.0f}%")
        if record["bad_samples"]:
            line += f"  bad samples {record['bad_samples']} (e.g. {self.bad_keys[0]})"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.wandb_run is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            scalars.update({f"loss_t{i}": v for i, v in enumerate(record["loss_by_t"]) if v is not None})
            self.wandb_run.log(scalars, step=record["step"])

    def log_image(self, step: int, path: Path, caption: str) -> None:
        if self.wandb_run is not None and dist.is_main():
            import wandb
            self.wandb_run.log({"samples": wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None and dist.is_main():
            self.wandb_run.finish()


def start_wandb(mode: str, out_dir: Path, project: str, name: str, config: dict):
    """A wandb run (rank 0 only) that continues after a restart, or None; never blocks on the network."""
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
    for attempt_mode in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            settings = wandb.Settings(init_timeout=30, silent=True)
            return wandb.init(project=project, name=name, id=run_id, resume="allow", mode=attempt_mode,
                              dir=str(out_dir), config=config, settings=settings)
        except Exception as err:  # network down, auth missing: fall back, never stop the run
            print(f"warning: wandb {attempt_mode} failed ({type(err).__name__}: {str(err)[:100]})")
    return None
