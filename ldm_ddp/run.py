"""The run's lifecycle, shared by every trainer (the UNet's train_loop and the autoencoder's): start, resume
from a checkpoint's named parts, the upkeep each iteration agrees on across ranks (stop, log, sample, save),
the save with its agreement and error policy, the bad-sample and skipped-step totals, and the end.

Also the two functions of (seed, step, rank) every trainer uses: the learning rate and the step's generator.
"""
from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, dist, faults
from .config import Config, ConfigError, OptimConfig, resolve_batch, warnings_for
from .metrics import append_jsonl, set_aside_records
from .remote import Remote, UploadFailed
from .resume import check_resumable, check_writable, record_resume, resume_point
from .saver import Outcome, Saver


def lr_at(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch's random draws: a pure function of (seed, step, rank, micro)."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


@dataclass
class Upkeep:
    """What this iteration of the loop does before its step, the same on every rank."""
    done: bool  # the last step is behind us
    stop: faults.Stop | None  # preempted, or too many non-finite steps: save, then raise this
    log: bool
    sample: bool
    save: bool
    validate: bool = False  # the held-out validation loss (validation.py), logged with this step's record


class Run:
    """One training run in cfg.train.out_dir: its process group, step counter, checkpoints and totals."""

    def __init__(self, cfg: Config, sample_grids: bool = True):
        """Start the process group; create the run folder on rank 0. From here on SIGTERM / SIGUSR1 mean
        "save at the next step and exit" (not before: a rendezvous can wait for minutes, and a process with
        nothing to save yet may as well end at once)."""
        self.cfg = cfg
        self.device = dist.init(cfg.train.device, cfg.train.startup_timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.grad_accum, self.global_batch = resolve_batch(cfg, self.world)
        self.preemption = faults.Preemption()
        # Input shapes this rank has yet to meet, each a graph to compile (aspect-ratio buckets, compiled):
        # set by the loop; while any rank has one, collectives keep the start-up timeout (upkeep).
        self.shapes_pending = False
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        error = ""
        # Rank 0 writes every checkpoint (the state is the same on every rank), and uploads it.
        self.saver = Saver(cfg.ckpt.snapshot, background=cfg.ckpt.async_save)
        self.remote: Remote | None = None  # rank 0's
        self.save_figures: dict[str, float] = {}  # the last save's seconds, for the next metrics record
        if dist.is_main():
            try:  # the run folder and checkpoints/ take a file now, or the run stops before any step
                check_writable(self.out_dir, "train.out_dir")
                check_writable(self.ckpt_dir, "train.out_dir")
                if cfg.ckpt.remote:
                    self.remote = Remote(cfg.ckpt.remote)
                    self.remote.check_writable()
                (self.out_dir / "config.toml").write_text(cfg.to_toml())
            except (ConfigError, OSError) as err:
                error = str(err)
            else:
                self._say_layout(sample_grids)
                for line in warnings_for(cfg):
                    print(f"warning: {line}", flush=True)
        if dist.all_reduce_max_ints([bool(error)])[0]:  # every rank stops with the same exit code
            raise ConfigError(error or "train.out_dir: not writable on rank 0")
        self.step = self.start_step = 0
        self.resume_path: Path | None = None
        self.fingerprint, self.architecture, self.identity = "", {}, {}
        self.state: checkpoint.TrainingState | None = None  # what a save writes (set by resume)
        self.guard = faults.NonFiniteGuard(cfg.train.max_consecutive_skips)
        # Replaced samples: by this process since the start,
        # and by all ranks as of the last save or the resume.
        self.bad_seen = self.bad_total = self.bad_before = 0
        self.bad_pending: list[list] = []  # [step, key, reason] of this rank, for bad_samples.jsonl at a save

    def _say_layout(self, sample_grids: bool) -> None:
        """Where this run writes, in one line (rank 0)."""
        cfg = self.cfg
        grids = f", samples/ every {cfg.sample.every} steps" if sample_grids and cfg.sample.every else ""
        print(f"run folder {self.out_dir}: checkpoints/ every {cfg.ckpt.every} steps (last {cfg.ckpt.keep} "
              f"kept){grids}, metrics.jsonl every {cfg.log.every} steps", flush=True)

    def resume(self, state: checkpoint.TrainingState, architecture: dict, fingerprint: str,
               identity: dict | None = None) -> None:
        """Restore `state` from the newest valid checkpoint (or ckpt.resume's), refusing one whose state would
        mean something else now (architecture, data, seed, global batch, and each entry of `identity`, which
        every checkpoint of the run records: e.g. the DPO reference's sha256); set aside later steps of
        another timeline. Every rank sees the same data first (check_same_data)."""
        self.architecture, self.fingerprint, self.identity = architecture, fingerprint, identity or {}
        faults.check_same_data(fingerprint)  # e.g. a shard one node cannot read: refused here,
        # not trained around
        self.resume_path = resume_point(self.cfg, self.ckpt_dir, self.remote)
        if self.resume_path is not None:
            changes = {}

            def check(meta: dict) -> None:
                changes.update(check_resumable(meta, self.cfg, architecture, self.global_batch, fingerprint,
                                               self.resume_path))
                for key, now in self.identity.items():
                    if meta.get(key) != now:
                        raise ConfigError(f"{self.resume_path}: {key} {json.dumps(meta.get(key))} in the "
                                          f"checkpoint, {json.dumps(now)} now; resume with the same one or "
                                          "start a new train.out_dir")
            meta = checkpoint.load_training_state(self.resume_path, state, check)
            self.step = self.start_step = int(meta["step"])
            self.guard = faults.NonFiniteGuard(self.cfg.train.max_consecutive_skips, meta.get("faults", {}))
            self.bad_total = meta["data"].get("bad_samples", 0)
            record_resume(self.out_dir, self.resume_path, self.step, changes)  # allowed changes, on record
        if dist.is_main():  # later steps of another timeline in this folder: set aside,
            # not resumed into or pruned; so are the metric records an interrupted attempt logged past them
            checkpoint.set_aside_after(self.ckpt_dir, self.start_step)
            if self.remote is not None:
                try:
                    self.remote.set_aside_after(self.start_step)
                except Exception as err:  # noqa: BLE001 -- a listing failed: the next start tries again
                    print(f"warning: ckpt.remote: cannot list {self.remote.url} "
                          f"({checkpoint.one_line(err)})", flush=True)
            set_aside_records(self.out_dir / "metrics.jsonl", self.start_step)
            if self.start_step >= self.cfg.train.max_steps:
                print(f"nothing to do: already at train.max_steps ({self.cfg.train.max_steps}); raise it to "
                      "train on", flush=True)
        self.bad_before = self.bad_total
        self.state = state

    def upkeep(self) -> Upkeep:
        """Decide what to do before the next step; collectives, so every rank calls it every iteration."""
        cfg, step = self.cfg, self.step
        if step == self.start_step + 1 and dist.is_main() and self.state is not None:  # the first step is
            # done, the optimizer's moments exist now: pin the host buffers of every save
            self.state.gather(shapes_only=True)
            self.saver.prepare(checkpoint.training_state_tensors(self.state, {})[0])
        done = step >= cfg.train.max_steps
        # A preemption signal to any rank stops every rank here, at the same step, after one more save; and
        # every rank learns here, at the same step, how a save in the background ended (rank 0 writes it).
        outcome = self.saver.poll() if dist.is_main() else None
        in_flight = self.saver.step_in_flight + 1 if dist.is_main() and self.saver.busy() else 0
        signum, ended, in_flight, pending = dist.all_reduce_max_ints(
            [self.preemption.signum, _ended(outcome), in_flight, int(self.shapes_pending)])
        if step > self.start_step:  # from the first step done on, a peer that dies or hangs stops us; but
            # a rank meeting a new input shape compiles its graph first (minutes, cold) while the others wait
            dist.set_timeout(cfg.train.startup_timeout_s if pending else cfg.train.collective_timeout_s)
        self._settled(ended, outcome, must_commit=False)
        stop = self.preemption.stop_at(signum, step, checkpoint.checkpoint_path(self.ckpt_dir, step))
        stop_on_saved = bool(stop is not None and in_flight and not done)
        if stop_on_saved:
            # A save still being written when the signal came becomes the preemption's checkpoint: waiting
            # for its rest takes less than a whole save more (a scheduler's grace period may not hold two
            # SDXL-size saves). The few steps since it are redone, bit for bit, on resume.
            with dist.timeout(cfg.train.startup_timeout_s):
                self._settle(must_commit=True)
            stop = self.preemption.stop_at(signum, step, checkpoint.checkpoint_path(self.ckpt_dir,
                                                                                    in_flight - 1))
        active = step > self.start_step
        if active and (step % cfg.log.every == 0 or step % cfg.ckpt.every == 0 or done or stop is not None):
            # The skipped-step flags are read where the loop syncs anyway, and before every save, so that a
            # checkpoint counts every skip so far.
            stop = stop or self.guard.check()
        validate = active and cfg.val.every > 0 and (step % cfg.val.every == 0 or done) and stop is None
        log = active and (step % cfg.log.every == 0 or done or stop is not None or validate)
        sample = active and cfg.sample.every > 0 and (step % cfg.sample.every == 0 or done) and stop is None
        save = not stop_on_saved and ((active and (step % cfg.ckpt.every == 0 or done)) or stop is not None)
        return Upkeep(done, stop, log, sample, save, validate)

    def count_step(self, skipped: torch.Tensor, bad: list[tuple[str, str]], keys: list[str]) -> None:
        """One optimizer step taken (or skipped: a device bool)
        with these replaced samples ((key, reason) each) and sample keys."""
        self.step += 1
        self.bad_seen += len(bad)
        self.bad_pending += [[self.step, key, reason] for key, reason in bad]
        self.guard.add(self.step, skipped, keys)

    def run_meta(self) -> dict:
        """The run's part of a checkpoint's metadata (the state's own parts are added by checkpoint.py)."""
        cfg, samples = self.cfg, self.step * self.global_batch
        return {"samples_seen": samples, "config": cfg.to_dict(), "world_size": self.world,
                "lr_schedule": {**vars(cfg.optim), "max_steps": cfg.train.max_steps,
                                "lr_now": lr_at(cfg.optim, self.step, cfg.train.max_steps)},
                "data": {"samples_seen": samples, "seed": cfg.data.seed, "global_batch": self.global_batch,
                         "fingerprint": self.fingerprint, "source": cfg.data.source,
                         "shuffle_window": cfg.data.shuffle_window, "bad_samples": self.bad_total},
                "architecture": self.architecture, "faults": self.guard.state(), **self.identity}

    def save(self, state: checkpoint.TrainingState, must_commit: bool, on_commit=None) -> None:
        """Save the state of this step: rank 0 copies it aside (saver.py) and writes, commits, prunes and
        uploads the copy in the background while training goes on (ckpt.async_save; else before it returns).
        A save waits for the one before; the final and the preemption saves are waited for. Every rank learns
        each outcome at the same step: a failed write (disk full, I/O error) or upload leaves the previous
        checkpoint as the resume point, and ckpt.on_save_error says whether the run goes on, the same on every
        rank; the final and the preemption saves must commit.
        `on_commit(path, step)` runs on rank 0 after the commit, in the save's job (e.g. a wandb artifact)."""
        path = checkpoint.checkpoint_path(self.ckpt_dir, self.step)
        if self.step == self.start_step and path == self.resume_path:
            return  # the state this run resumed from: committed already
        # Replaced samples so far, all ranks (a collective: every rank calls save); resumed runs add theirs.
        # Host integers on the control group: a save does not wait for the GPU to drain its queue.
        (seen,) = dist.all_reduce_sum_ints([self.bad_seen])
        self.bad_total = self.bad_before + seen
        self._write_bad_samples()
        # The other ranks wait in the outcome's all-reduce while rank 0 writes: saves get the startup timeout.
        with dist.timeout(self.cfg.train.startup_timeout_s):
            self._settle(must_commit=False)  # at most one save in flight
            state.gather()
            if dist.is_main():
                tensors, meta = checkpoint.training_state_tensors(state, self.run_meta())
                raw = checkpoint.checkpoint_metadata(self.step, meta)
                self.saver.start(self.step, tensors, partial(self._commit, self.step, raw, on_commit))
            if must_commit or not self.cfg.ckpt.async_save:
                self._settle(must_commit)

    def _commit(self, step: int, raw: dict[str, str], on_commit, tensors: dict[str, torch.Tensor]) -> Path:
        """The save's job on the copied state (rank 0; the saver's thread): write and commit, then retention
        and on_commit, then the upload (UploadFailed: committed here, not there). -> the committed path."""
        path = checkpoint.commit_checkpoint(self.ckpt_dir, step, tensors, raw)
        checkpoint.prune_checkpoints(self.ckpt_dir, self.cfg.ckpt.keep, just_saved=path)
        if on_commit is not None:
            on_commit(path, step)
        if self.remote is not None:
            self.remote.upload(path)
            self.remote.prune(self.cfg.ckpt.keep, path.name)
        return path

    def _settle(self, must_commit: bool) -> None:
        """Wait for the save in flight and agree on its outcome (a collective)."""
        outcome = self.saver.wait() if dist.is_main() else None
        self._settled(dist.all_reduce_max_ints([_ended(outcome)])[0], outcome, must_commit)

    def _settled(self, ended: int, outcome: Outcome | None, must_commit: bool) -> None:
        """Act on an agreed outcome (_ended's codes), the same on every rank: rank 0 keeps its timings; a
        failure stops the run or warns (ckpt.on_save_error). A checkpoint committed here but not uploaded
        follows the same policy, except for the final and preemption saves: the run ends as planned, with a
        warning (the checkpoint exists; the upload is not worth exit 5 or a scheduler's grace period)."""
        if outcome is not None:
            self.save_figures = {"ckpt_step": outcome.step,
                                 **{f"ckpt_{k}_s": v for k, v in outcome.timings.items()}}
        if ended < 2:
            return
        error = "see rank 0"
        if outcome is not None:
            err = outcome.error
            if not isinstance(err, OSError):  # not the disk's or the network's doing: show where it came from
                traceback.print_exception(err)
            error = " ".join(str(err).split()) or type(err).__name__
        kept = checkpoint.list_checkpoints(self.ckpt_dir)
        if ended == 3:
            lost = f"{error}; it is committed in {self.ckpt_dir} only"
            if must_commit:
                if dist.is_main():
                    print(f"warning: {lost}", flush=True)
                return
        else:
            name = checkpoint.checkpoint_path(self.ckpt_dir, outcome.step if outcome else self.step).name
            lost = f"checkpoint {name} not saved ({error}); " + (
                f"{kept[-1].name} stays the resume point" if kept else "no checkpoint to resume from")
        if must_commit or self.cfg.ckpt.on_save_error == "stop":
            raise faults.SaveFailed(lost)
        if dist.is_main():
            print(f"warning: {lost}; training goes on (ckpt.on_save_error = continue)", flush=True)

    def take_save_figures(self) -> dict[str, float]:
        """The last ended save's step and seconds (rank 0), once: for the next metrics record."""
        figures, self.save_figures = self.save_figures, {}
        return figures

    def _write_bad_samples(self) -> None:
        """Every rank's replaced samples since the last save -> <out_dir>/bad_samples.jsonl on rank 0, one
        record each ({"step", "rank", "key", "reason"}; the log line names one example). Written with the
        save, so the file holds the committed steps: steps redone after a crash are recorded once."""
        gathered = dist.all_gather_str(json.dumps(self.bad_pending))  # a collective: rare and small
        self.bad_pending = []
        if dist.is_main():
            records = [{"step": step, "rank": rank, "key": key, "reason": reason}
                       for rank, text in enumerate(gathered) for step, key, reason in json.loads(text)]
            for record in sorted(records, key=lambda r: (r["step"], r["rank"])):
                append_jsonl(self.out_dir / "bad_samples.jsonl", record)

    def stop(self, stop: faults.Stop) -> None:
        """End a run that has saved and stops on purpose: raise `stop` (its exit code), ignoring late signals:
        Python's shutdown would restore the default action, and a late SIGTERM (torchrun's, once another rank
        has exited) would turn exit 75 into a kill."""
        self.preemption.ignore()
        raise stop

    def close(self, *closers) -> None:
        """The end of a finished run, on every rank: a barrier, then `closers` (e.g. the metrics' close; rank
        0's wandb finish may upload for minutes, past the collective timeout, so after the barrier)."""
        dist.barrier()
        for close in closers:
            close()
        self.preemption.restore()


def _ended(outcome: Outcome | None) -> int:
    """0: no save ended; 1: one committed; 2: one failed; 3: one committed here but not uploaded (the max
    over ranks is rank 0's)."""
    if outcome is None:
        return 0
    return 1 if outcome.error is None else 3 if isinstance(outcome.error, UploadFailed) else 2
