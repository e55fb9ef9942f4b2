"""What the loop does when something goes wrong: preemption signals, non-finite steps, and how the run stops.

Exit codes of scripts/train.py, the same on every rank (under torchrun, its failure report names them):

| code | meaning |
|---|---|
| 0 | finished |
| 1 | an unexpected error (a traceback) |
| 2 | a config error, a refused resume or an unreadable checkpoint asked for by path (one line) |
| 3 | `train.max_consecutive_skips` non-finite steps in a row; the last good state was saved |
| 4 | a collective failed or timed out: another rank died or hung (one line) |
| 5 | a checkpoint could not be written and the run could not go on; the previous one is the resume point |
| 75 | preempted (SIGTERM or SIGUSR1): a checkpoint was committed; run the same command again (EX_TEMPFAIL) |
| 130 | interrupted (Ctrl-C, SIGINT): nothing saved; the last checkpoint is the resume point |
"""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import torch

from . import dist
from .config import ConfigError

EXIT_NON_FINITE, EXIT_PEER_FAILURE, EXIT_SAVE_FAILED, EXIT_PREEMPTED = 3, 4, 5, 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # torchrun and Kubernetes send SIGTERM;
# SLURM's --signal USR1


class Stop(Exception):
    """The run stops on purpose: a one-line message and the process's exit code."""
    exit_code = 1


class Preempted(Stop):
    exit_code = EXIT_PREEMPTED


class NonFiniteLimit(Stop):
    exit_code = EXIT_NON_FINITE


class SaveFailed(Stop):
    exit_code = EXIT_SAVE_FAILED


class Preemption:
    """SIGTERM / SIGUSR1 set a flag instead of ending the process (installed until `restore()`).

    The flag is read only where all ranks agree on it (Run.upkeep all-reduces it once per step: `stop_at`),
    so every rank stops at the same step and saves the same state, whichever rank the signal reached. A
    Python handler runs between bytecodes and interrupted system calls are retried (PEP 475): a signal
    during a write changes nothing.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._note) for s in PREEMPTION_SIGNALS}

    def _note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def stop_at(self, signum: int, step: int, path) -> Preempted | None:
        """`signum`: the largest signal number any rank noted (an all-reduce of `signum` on every rank, once
        per step, so every rank stops at the same step whichever one the signal reached). -> the stop to
        raise once `path`, the checkpoint of `step`, is committed; None when no rank was signalled."""
        if not signum:
            return None
        return Preempted(f"preempted by {signal.Signals(signum).name} at step {step}: checkpoint {path.name} "
                         "committed; run the same command again to resume")

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def ignore(self) -> None:
        """For a run that has stopped and saved, and only exits: Python's shutdown would restore the default
        action, and a late SIGTERM (torchrun's, once another rank has exited) would turn exit 75
        into a kill."""
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def end_with_launcher() -> None:
    """Under torchrun (Linux): SIGTERM to this rank when its launcher dies. A launcher killed with kill -9
    sends its workers nothing; they would train on, and write checkpoints into the run folder that the next
    launch of the same command resumes from. With this they stop: before `Preemption` is installed at once
    (nothing to save yet), afterwards as if preempted (all of them at once: they agree, save and exit 75).
    Armed first thing in the entry point; a launcher already gone by then has left this rank a child of init,
    and it stops the same way, unless init is the launcher itself (a container whose command is torchrun).
    Under a subreaper (e.g. systemd --user) the orphan's new parent is not init: not detected."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.path.exists("/proc/self"):
        return
    if arm_parent_death_signal() and os.getppid() == 1 and not _init_is_a_launcher():
        os.kill(os.getpid(), signal.SIGTERM)


def arm_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel sends this process SIGTERM when its parent dies."""
    import ctypes
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0


def _init_is_a_launcher(cmdline_file: str = "/proc/1/cmdline") -> bool:
    """Whether PID 1 (of this PID namespace) is torchrun itself: `docker run ... torchrun ...` and Kubernetes
    pods without an init process start it as PID 1, and its ranks are then its children, not orphans."""
    try:
        cmdline = Path(cmdline_file).read_bytes()
    except OSError:
        return False
    return any(name in cmdline
               for name in (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch"))


def shield_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores preemption signals from anyone but its parent.

    torchrun signals the whole process group (killpg), SLURM every process of the job, and a worker killed by
    SIGTERM makes the training process raise wherever it is (even mid-save): the training process alone
    decides, and ends its workers. Their parent's SIGTERM (multiprocessing ending daemon workers at exit) must
    still end them, and a Python handler is not told who sent a signal: a thread takes SIGTERM synchronously
    with sigwaitinfo, which is.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on
    # inherit the mask
    threading.Thread(target=_exit_on_parent_sigterm, daemon=True).start()


def _exit_on_parent_sigterm() -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass
    os._exit(0)


def optimizer_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor | None,
                   divisor: torch.Tensor | None = None) -> None:
    """`optimizer.step()` on the gradients divided by `divisor` (a device scalar: the clip,
    speed.clip_divisor; None: as they are), unless `ok` (a device bool; None: always) is False; a skipped
    step leaves weights, moments and step counts exactly as they were.

    Fused AdamW does both on the device, inside its one pass: `grad_scale` and `found_inf` (the inputs
    GradScaler uses) divide each gradient as it is read, and make the kernel return early with the step counts
    it added subtracted again, so no host sync. The foreach and for-loop versions have no such inputs: they
    divide in a pass of their own and pay one host sync per step for `ok`.
    """
    if optimizer.defaults.get("fused"):
        optimizer.grad_scale = divisor  # set on every call: read by every later step()
        optimizer.found_inf = None if ok is None else (~ok).float()
        optimizer.step()
        return
    if divisor is not None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_div_(grads, divisor)
    if ok is None or ok.item():
        optimizer.step()


class NonFiniteGuard:
    """Counts skipped steps; stops the run after `limit` in a row.

    The per-step flags stay on the device until `check()`, which the loop calls where it syncs anyway (a log
    line, a save): the run stops at most `log.every` - 1 steps after the limit, and since none of those steps
    was applied its state is still the last good one. The flags are identical on every rank (the decision
    comes from all-reduced gradients), so every rank stops at the same check.
    """

    def __init__(self, limit: int, state: dict | None = None):
        """`state`: state() of the checkpoint resumed from (a streak of skips goes on across a resume)."""
        state = state or {}
        self.limit, self.total = limit, state.get("skipped_steps", 0)
        self.in_a_row = state.get("skipped_in_a_row", 0)
        # (step, this rank's keys) of the current bad run; keys None for a run that began before the resume
        self.run_start: tuple[int, list[str] | None] | None = (
            (state["skipped_since"], None) if self.in_a_row and "skipped_since" in state else None)
        self._pending: list[tuple[int, torch.Tensor, list[str]]] = []

    def state(self) -> dict:
        """For the checkpoint (after check(): the flags read so far)."""
        return {"skipped_steps": self.total, "skipped_in_a_row": self.in_a_row,
                **({"skipped_since": self.run_start[0]} if self.in_a_row and self.run_start else {})}

    def add(self, step: int, skipped: torch.Tensor, keys: list[str]) -> None:
        """Step `step` (1-based) was skipped or not (a device bool); `keys` are this rank's samples of it."""
        self._pending.append((step, skipped, keys))

    def check(self) -> NonFiniteLimit | None:
        """Read the flags since the last call (a host sync);
        -> the error to stop with once the limit is hit."""
        if not self._pending:
            return None
        flags = torch.stack([skipped for _, skipped, _ in self._pending]).tolist()
        hit = None
        for (step, _, keys), skipped in zip(self._pending, flags):
            self.total += skipped
            self.in_a_row = self.in_a_row + 1 if skipped else 0
            if self.in_a_row == 1:
                self.run_start = (step, keys)
            if self.in_a_row >= self.limit and hit is None:  # >=: a resume of the stopped run stops again
                hit = step
        self._pending = []
        if hit is None:
            return None
        first, keys = self.run_start
        if keys is None:
            named = "not recorded (before the resume)"
        else:
            # every rank's part of it
            by_rank = [json.loads(k) for k in dist.all_gather_str(json.dumps(keys))]
            named = "; ".join(f"rank {r}: {', '.join(k[:8])}" for r, k in enumerate(by_rank))
        return NonFiniteLimit(f"non-finite loss or gradients in {hit - first + 1} steps in a row "
                              f"(steps {first}-{hit}, none applied; "
                              f"train.max_consecutive_skips = {self.limit}): stopped with the last good "
                              f"state saved. Samples of step {first}: {named}")


def check_same_data(fingerprint: str) -> None:
    """Refuse to start when ranks see different data (e.g. a shard unreadable on one node): the global order
    would differ between ranks. One line, the same on every rank."""
    seen = dist.all_gather_str(fingerprint)
    if len(set(seen)) > 1:
        ranks = {f: [r for r, g in enumerate(seen) if g == f] for f in dict.fromkeys(seen)}
        listed = "; ".join(f"{f} on rank(s) {', '.join(map(str, r[:8]))}{' ...' if len(r) > 8 else ''}"
                           for f, r in ranks.items())
        raise ConfigError(f"data: the ranks see different data sources ({listed}); every rank must read the "
                          "same files (check data.path and that each node sees all of them)")
