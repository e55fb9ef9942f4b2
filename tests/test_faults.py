"""Faults injected for real into 2-rank gloo runs of scripts/train.py: kill -9 inside a save, SIGTERM /
SIGUSR1 at step 0, during sampling and during a save (DataLoader workers on), non-finite gradients, a full
disk, a hung peer, ranks that see different data. Each run is compared bitwise with one that was never
interrupted, where that applies. Then the pieces in-process: the skipped update, the skip limit, drift on
resume (refused or recorded).

Ranks are started either by torchrun or directly with torchrun's environment (`ranks`), so that a test can
signal, stop or limit one rank. Every wait has a hard limit; time limits on the faults themselves are
generous.
"""

import contextlib
import copy
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, script_env
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import assert_bitwise_equal

from ldm_ddp import checkpoint as ckpt
from ldm_ddp import faults
from ldm_ddp.config import Config, ConfigError, EMAConfig
from ldm_ddp.data.stream import DataFailure
from ldm_ddp.ema import EMA
from ldm_ddp.faults import (
    EXIT_NON_FINITE,
    EXIT_PEER_FAILURE,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
)
from ldm_ddp.models import ASSET_DIR
from ldm_ddp.resume import check_resumable, record_resume

STEPS = 8  # every bitwise comparison is at this step, against the `reference` run


def config(tiny_args, out, **changes) -> list[str]:
    """The run all fault tests share (changes that do not touch the training state are allowed)."""
    return tiny_args(out, **{"train__max_steps": STEPS, "train__seed": 3, "ckpt__every": 2, "ckpt__keep": 100,
                             "log__every": 1, **changes})


def final(out) -> Path:
    return out / "checkpoints" / f"step_{STEPS:07d}.safetensors"


def wait_until(predicate, timeout: float, what: str, poll: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logged_step(log: Path, step: int) -> bool:
    return log.exists() and f"\nstep {step:>7d}  loss" in "\n" + log.read_text()


class Launch:
    """Processes of one launch, each in its own session (as torchrun starts workers), output to log files;
    a context manager that kills whatever is left."""

    def __init__(self, cmds: list[list[str]], envs: list[dict], logs: list[Path]):
        self.logs, self.procs = logs, []
        for cmd, env, log in zip(cmds, envs, logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def output(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = 150) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n" + "\n".join(
                self.output(i)[-2000:] for i in range(len(self.procs)))) from None

    def kill(self) -> None:
        """SIGKILL what is left, children first: torchrun's workers run in sessions of their own."""
        for p in self.procs:
            for pid in [*descendants(p.pid), p.pid] if p.poll() is None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def ranks(log_dir: Path, args: list[str], nproc: int = 2, rank_args: dict | None = None) -> Launch:
    """`nproc` ranks of scripts/train.py with torchrun's environment but no launcher: rank r's pid is
    procs[r]."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    envs = [{**script_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
             for r in range(nproc)]
    cmds = [[sys.executable, "scripts/train.py", *args, *(rank_args or {}).get(r, [])] for r in range(nproc)]
    return Launch(cmds, envs, [log_dir / f"rank{r}.log" for r in range(nproc)])


def torchrun(log: Path, args: list[str]) -> Launch:
    """`torchrun --nproc_per_node 2 scripts/train.py ...` (its output, and its workers', in `log`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1",
           "--master_port", str(free_port()), "scripts/train.py", *args]
    return Launch([cmd], [script_env()], [log])


def parent_of(entry: Path) -> int:
    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and parent_of(entry) == pid:
                children.append(int(entry.name))
    return [d for child in children for d in [*descendants(child), child]]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (its child whose environment says RANK=rank), if running."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and parent_of(entry) == launcher_pid \
                    and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:  # the process ended meanwhile
            continue
    return None


def temp_file_of(out: Path, step: int) -> Path | None:
    return next((out / "checkpoints").glob(f".step_{step:07d}.safetensors.tmp-*"), None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_args) -> Path:
    """The uninterrupted 2-rank run every fault test ends equal to (its checkpoints: read only)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with ranks(out.parent / "logs", config(tiny_args, out)) as launch:
        assert launch.wait() == [0, 0], launch.output(0)[-3000:]
    return out


@pytest.mark.slow
def test_kill9_inside_a_save_then_the_same_command_resumes_bitwise(tmp_path, tiny_args, reference):
    """kill -9 of rank 0 while it writes step 4 (or 6): the other rank stops at once with a clear error; the
    same torchrun command again removes the leftover temp file, resumes from the save before and ends bitwise
    equal.
    (Not `torchrun --max-restarts`: its restarts can fail to reconnect gloo, pytorch/pytorch#167288.)"""
    out = tmp_path / "run"
    with torchrun(tmp_path / "killed.log", config(tiny_args, out)) as launch:
        wait_until(lambda: (out / "checkpoints" / "step_0000002.safetensors").exists(), 120, "step 2")
        rank0 = wait_until(lambda: worker_pid(launch.procs[0].pid, 0), 10, "rank 0")
        # a save of the tiny state lasts milliseconds: a busy machine's poller may miss step 4's, so 6's too
        temp = wait_until(lambda: temp_file_of(out, 4) or temp_file_of(out, 6), 60, "a save to start")
        os.kill(rank0, signal.SIGKILL)
        killed = int(temp.name.split(".")[1].split("_")[1])
        killed_inside = not (out / "checkpoints" / f"step_{killed:07d}.safetensors").exists()
        assert launch.wait(60) == [1], launch.output()[-3000:]
    assert killed_inside and temp.exists()
    assert "error: rank 1: a collective failed" in launch.output()  # at once: its peer's sockets closed
    with torchrun(tmp_path / "again.log", config(tiny_args, out)) as launch:
        assert launch.wait() == [0], launch.output()[-3000:]
    before = killed - 2  # the checkpoint before the killed save
    assert f"step_{before:07d}.safetensors at step {before}" in launch.output() and not temp.exists()
    assert_bitwise_equal(final(reference), final(out))


@pytest.mark.slow
def test_preemption_at_step_0_during_sampling_and_during_a_save_resumes_bitwise(tmp_path, tiny_args,
                                                                                reference):
    """SIGTERM to rank 0 during setup, SIGUSR1 to rank 1 during live sampling, SIGTERM to torchrun during
    step 6's samples or save (DataLoader workers on): each time every rank saves within 20 s and exits 75; the
    last run ends bitwise equal."""
    out = tmp_path / "run"
    # recorded as changes on resume
    longer = {"train__max_steps": 1000, "sample__every": 3, "sample__steps": 60}

    def preempted(launch, sent: float, step: int) -> None:
        assert launch.wait(90) == [EXIT_PREEMPTED] * len(launch.procs), launch.output()[-3000:]
        path = out / "checkpoints" / f"step_{step:07d}.safetensors"
        assert "preempted by SIG" in launch.output() and f"{path.name} committed" in launch.output()
        assert path.stat().st_mtime - sent < 20  # torchrun's SIGKILL comes 30 s after its SIGTERM
        ckpt.load_checkpoint(path)

    with ranks(tmp_path / "a", config(tiny_args, out, **longer)) as launch:  # step 0: during model setup
        wait_until(lambda: (out / "config.toml").exists(), 120, "rank 0 to start", poll=0.01)
        sent = time.time()
        os.kill(launch.procs[0].pid, signal.SIGTERM)
        preempted(launch, sent, 0)
    with ranks(tmp_path / "b", config(tiny_args, out, **longer)) as launch:  # live sampling after step 3
        wait_until(lambda: logged_step(launch.logs[0], 3), 120, "step 3", poll=0.01)
        sent = time.time()
        os.kill(launch.procs[1].pid, signal.SIGUSR1)
        preempted(launch, sent, 4)
    assert (out / "samples" / "step_0000003.png").exists()
    with torchrun(tmp_path / "c.log", config(tiny_args, out, **longer, data__num_workers=1)) as launch:
        # The tiny state's save lasts milliseconds: a poller on a busy machine can miss its temp file, so
        # step 6's log line counts too (its live samples come next, then its save)
        wait_until(lambda: temp_file_of(out, 6) or logged_step(launch.logs[0], 6), 120, "step 6's save")
        sent = time.time()
        launch.procs[0].send_signal(signal.SIGTERM)  # torchrun passes it on to its process groups (killpg)
        assert launch.wait(90) == [1], launch.output()[-3000:]  # torchrun itself exits 1 when signalled
        # Step 7 stops: on its own save, or on step 6's when that one is still being written (a slow disk)
        stopped = re.search(r"preempted by SIGTERM at step 7: checkpoint step_000000([67])\.safetensors "
                            "committed", launch.output())
        assert stopped, launch.output()[-3000:]
        kept = f"step_000000{stopped[1]}.safetensors"
        assert (out / "checkpoints" / kept).stat().st_mtime - sent < 20
    undeletable = out / "checkpoints" / "step_0000001.safetensors"
    # retention cannot delete it (not even as root): a failed delete must not stop the run
    undeletable.mkdir()
    with ranks(tmp_path / "d", config(tiny_args, out, ckpt__keep=2)) as launch:
        assert launch.wait() == [0, 0], launch.output()[-3000:]
    text = launch.output()
    assert f"changed since {kept}: " in text and "train.max_steps 1000 -> 8" in text
    assert f"warning: could not delete {undeletable}" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [undeletable.name, kept,
                                                                        final(out).name]
    assert_bitwise_equal(final(reference), final(out))
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumes] == [0, 4, int(stopped[1])]
    assert (resumes[-1]["config"]["train.max_steps"] == [1000, STEPS]
            and "sample.every" in resumes[-1]["config"])


@pytest.mark.slow
def test_kill9_of_torchrun_stops_its_ranks_with_a_checkpoint(tmp_path, tiny_args):
    """kill -9 of torchrun itself: it tells its workers nothing, so each rank asked the kernel for SIGTERM on
    its parent's death (faults.end_with_launcher); they stop together as if preempted, with a checkpoint, and
    no process of the run is left to write into the folder that the next launch resumes from."""
    out = tmp_path / "run"
    with torchrun(tmp_path / "killed.log", config(tiny_args, out, train__max_steps=1000)) as launch:
        wait_until(lambda: logged_step(launch.logs[0], 3), 120, "step 3", poll=0.01)
        workers = [wait_until(lambda r=r: worker_pid(launch.procs[0].pid, r), 10, f"rank {r}")
                   for r in (0, 1)]
        sent = time.time()
        launch.procs[0].send_signal(signal.SIGKILL)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 60,
                   "the orphaned ranks to end")
        stopped = re.search(r"preempted by SIGTERM at step (\d+): checkpoint (\S+) committed",
                            launch.output())
        assert stopped, launch.output()[-3000:]
        path = out / "checkpoints" / stopped.group(2)
        assert path.stat().st_mtime - sent < 20 and int(stopped.group(1)) >= 3
        ckpt.load_checkpoint(path)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """word -> a copy of the demo bundle whose text encoder embeds `word` as NaN: every caption with it makes
    the loss and the gradients NaN, on the rank whose batch holds it."""
    def make(word: str) -> Path:
        root = tmp_path_factory.mktemp(f"poisoned_{word}")
        shutil.copytree(ASSET_DIR / "demo", root, dirs_exist_ok=True)
        vocab = json.loads((root / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        path = root / "text_encoder" / "model.safetensors"
        with safe_open(path, framework="pt") as f:
            # safe_open has keys() but is not iterable
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors["embeddings.token_embedding.weight"][vocab[word]] = float("nan")
        save_file(tensors, path, metadata=metadata)
        return root
    return make


@pytest.mark.slow
def test_non_finite_steps_are_skipped_without_touching_the_state(tmp_path, tiny_args, poisoned):
    out = tmp_path / "run"
    args = config(tiny_args, out, train__max_steps=6, ckpt__every=1,
                  model__pretrained=str(poisoned("purple")))
    with ranks(tmp_path / "logs", args) as launch:
        assert launch.wait() == [0, 0], launch.output(0)[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["skipped_steps"]]
    assert 0 < len(skipped) < 6 and all(r["loss"] == r["loss"] for r in records)  # no NaN in the log
    states = [ckpt.load_checkpoint(out / "checkpoints" / f"step_{s:07d}.safetensors") for s in range(1, 7)]
    streak = next(i for i in range(7) if 6 - i not in skipped)  # skipped steps at the end of the run
    assert states[-1][1]["faults"]["skipped_steps"] == len(skipped)
    assert states[-1][1]["faults"]["skipped_in_a_row"] == streak
    for step in range(2, 7):
        (before, _), (after, _) = states[step - 2], states[step - 1]
        same = [k for k in after if torch.equal(after[k], before[k])
                and k.startswith(("unet.", "ema.", "optim."))]
        if step in skipped:  # weights, AdamW moments and step counts, EMA: all untouched
            assert len(same) == len(after), (step, sorted(set(after) - set(same))[:3])
        else:
            assert not any(k.startswith("unet.") and k.endswith("weight") for k in same), step
        assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_state(tmp_path, tiny_args, poisoned,
                                                                          run_script):
    out = tmp_path / "run"
    args = config(tiny_args, out, train__max_steps=20, train__max_consecutive_skips=3, log__every=2,
                  model__pretrained=str(poisoned("a")))  # "a" is in every caption phrasing
    result = run_script("scripts/train.py", *args, timeout=120)
    assert result.returncode == EXIT_NON_FINITE, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert (line.startswith("non-finite loss or gradients in 3 steps in a row (steps 1-3")
            and "shapes/" in line)
    # at the check, step 4
    tensors, meta = ckpt.load_checkpoint(out / "checkpoints" / "step_0000004.safetensors")
    assert meta["faults"] == {"skipped_steps": 4, "skipped_in_a_row": 4, "skipped_since": 1}
    assert all(torch.equal(tensors[k], tensors["ema." + k[5:]]) for k in tensors if k.startswith("unet."))
    optim = {k: t for k, t in tensors.items() if k.startswith("optim.")}
    assert optim and all(not t.any() for t in optim.values())  # no moment and no step count moved


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint_and_the_policy_holds_on_every_rank(tmp_path, tiny_args,
                                                                                    reference):
    """A real write error (the file size limit: EFBIG) from step 4 on. The previous checkpoint stays intact
    and the resume point; with ckpt.on_save_error = continue every rank trains on, and the final save, which
    must commit, stops the run (exit 5) as `stop` would have at the first failure."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    start = out / "checkpoints" / "step_0000002.safetensors"
    shutil.copy(reference / "checkpoints" / start.name, start)
    args = config(tiny_args, out, ckpt__on_save_error="continue")
    with ranks(tmp_path / "logs", args) as launch:
        for proc in launch.procs:  # set while Python still imports; logs fit, checkpoints do not
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        assert launch.wait() == [EXIT_SAVE_FAILED] * 2, launch.output(0)[-3000:]
    text = launch.output(0)
    assert "step_0000002.safetensors at step 2" in text
    for step in (4, 6):
        assert (f"warning: checkpoint step_{step:07d}.safetensors not saved ([Errno 27] File too large"
                in text and "step_0000002.safetensors stays the resume point; training goes on" in text)
    assert text.strip().splitlines()[-1].startswith(
        f"checkpoint step_{STEPS:07d}.safetensors not saved ([Errno 27]")
    assert f"step {STEPS:>7d}  loss" in launch.output(0)  # both ranks trained to the end
    assert [p.name for p in (out / "checkpoints").iterdir()] == [start.name]  # no temp file left either
    assert start.read_bytes() == (reference / "checkpoints" / start.name).read_bytes()


@pytest.mark.slow
def test_a_hung_peer_stops_the_others_within_the_collective_timeout(tmp_path, tiny_args):
    out = tmp_path / "run"
    with ranks(tmp_path / "logs", config(tiny_args, out, train__max_steps=10_000,
                                         train__collective_timeout_s=3.0)) as launch:
        wait_until(lambda: logged_step(launch.logs[0], 3), 120, "step 3", poll=0.01)
        os.kill(launch.procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert launch.procs[0].wait(timeout=60) == EXIT_PEER_FAILURE, launch.output(0)[-3000:]
        waited = time.monotonic() - stopped
        os.kill(launch.procs[1].pid, signal.SIGKILL)
    assert waited < 30, waited  # the 3 s timeout plus a step; generous for a loaded machine
    line = launch.output(0).strip().splitlines()[-1]
    assert line.startswith("error: rank 0: a collective failed") and "collective timeout (3 s)" in line


@pytest.mark.slow
def test_ranks_that_see_different_data_refuse_to_start(tmp_path, tiny_args):
    args = config(tiny_args, tmp_path / "run")
    with ranks(tmp_path / "logs", args, rank_args={1: ["--data.shapes_num_samples=65"]}) as launch:
        assert launch.wait() == [2, 2], launch.output(0)[-3000:]
    for r in (0, 1):
        line = launch.output(r).strip().splitlines()[-1]
        assert line.startswith("config error: data: the ranks see different data sources (shapes-v")
        assert ":n=64:res=64 on rank(s) 0;" in line and ":n=65:res=64 on rank(s) 1)" in line


# --- In-process checks of the pieces: no subprocess ---------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_a_skipped_update_changes_nothing_and_a_taken_one_is_plain_adamw(fused):
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    ema = EMA(model, EMAConfig(decay=0.9, extra_decays=[0.5], power_stds=[0.1]))

    def step(grad_fill=None) -> torch.Tensor:
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p) if grad_fill is None else torch.full_like(p, grad_fill)
            q.grad = p.grad.clone()
        ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        faults.optimizer_step(opt, ok)
        ema.update(model, ok)
        if ok:
            twin_opt.step()  # the same update, plainly
        return ok

    def state() -> tuple:
        return ([p.detach().clone() for p in model.parameters()],
                {(i, k): v.clone()
                 for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()},
                [t.clone() for shadow in ema.shadows for t in shadow])

    assert step() and step()
    before, updates = state(), ema.num_updates
    for fill in (float("nan"), float("inf")):
        assert not step(fill)
    after = state()
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k])
                                                       for k in before[1])
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert ema.num_updates == updates + 2  # the decay schedule follows the step count, like the learning rate
    assert step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))


def test_the_guard_counts_skips_and_stops_after_the_limit_in_a_row():
    guard = faults.NonFiniteGuard(limit=3, state={"skipped_steps": 7})
    flags = [False, True, True, False, True, True]
    for step, skipped in enumerate(flags, start=11):
        guard.add(step, torch.tensor(skipped), [f"shapes/{step}a", f"shapes/{step}b"])
    # the run goes on across checks
    assert guard.check() is None and guard.total == 11 and guard.in_a_row == 2
    guard.add(17, torch.tensor(True), ["shapes/17a"])
    guard.add(18, torch.tensor(False), ["shapes/18a"])
    stop = guard.check()
    assert isinstance(stop, faults.NonFiniteLimit) and stop.exit_code == EXIT_NON_FINITE
    assert str(stop).startswith("non-finite loss or gradients in 3 steps in a row (steps 15-17, none applied")
    assert str(stop).endswith("Samples of step 15: rank 0: shapes/15a, shapes/15b") and guard.total == 12


@pytest.mark.slow
def test_a_streak_of_skips_goes_on_across_a_resume(tmp_path, tiny_args, poisoned):
    """The checkpoint keeps the skips in a row and where they began: a run saved (here: its final save) in the
    middle of a streak and resumed stops at the limit counted from the streak's first step, not the limit
    again after the resume; resuming the stopped run stops again at its first skipped step."""
    from conftest import train_here
    out = tmp_path / "run"
    args = config(tiny_args, out, train__max_consecutive_skips=6, log__every=2,
                  model__pretrained=str(poisoned("a")))
    train_here(*args, "--train.max_steps=4")
    _, meta = ckpt.load_checkpoint(out / "checkpoints" / "step_0000004.safetensors")
    assert meta["faults"] == {"skipped_steps": 4, "skipped_in_a_row": 4, "skipped_since": 1}
    with pytest.raises(faults.NonFiniteLimit,
                       match=r"^non-finite loss or gradients in 6 steps in a row \(steps 1-6, "
                             r".*Samples of step 1: not recorded \(before the resume\)$"):
        train_here(*args, "--train.max_steps=20")
    with pytest.raises(faults.NonFiniteLimit, match=r"in 7 steps in a row \(steps 1-7, "):
        # resumes at step 6 with 6 in a row: step 7 is over the limit
        train_here(*args, "--train.max_steps=20")


def test_the_guard_state_round_trips():
    guard = faults.NonFiniteGuard(limit=3,
                                  state={"skipped_steps": 9, "skipped_in_a_row": 2, "skipped_since": 20})
    assert guard.state() == {"skipped_steps": 9, "skipped_in_a_row": 2, "skipped_since": 20}
    guard.add(22, torch.tensor(False), ["shapes/22a"])
    assert guard.check() is None and guard.state() == {"skipped_steps": 9, "skipped_in_a_row": 0}
    assert faults.NonFiniteGuard(limit=3).state() == {"skipped_steps": 0, "skipped_in_a_row": 0}


@pytest.mark.parametrize("raised, code, printed", [
    (lambda: faults.Preempted("preempted by SIGTERM at step 4: "
                              "checkpoint step_0000004.safetensors committed"),
     EXIT_PREEMPTED, "preempted by SIGTERM at step 4"),
    (lambda: RuntimeError("a bug"), 1, "Traceback (most recent call last)"),  # unexpected: its traceback
    (KeyboardInterrupt, 130, "interrupted"),
    (lambda: DataFailure("Caught DataFailure in DataLoader worker process 0.\n"
                         "Original Traceback (most recent call last):\n  ...\n"
                         "ldm_ddp.data.stream.DataFailure: data: 16 bad samples in a row"),
     1, "error: data: 16 bad samples in a row\n"),  # one line, whichever rank met it
], ids=["stop", "error", "ctrl-c", "data"])
def test_a_stopped_run_is_freed_before_the_process_group_is_torn_down(monkeypatch, capsys, tmp_path,
                                                                      raised, code, printed):
    """An exception raised from the loop keeps the loop's frame (DDP, the loader) alive through a reference
    cycle (a stop is a local of the frame) or while it is in flight (re-raised); the entry point frees both
    before dist.shutdown(), not in the interpreter's shutdown (where gloo's threads can abort a preempted
    rank), and keeps the exit codes."""
    import gc
    import weakref

    from ldm_ddp import cli, dist

    class RunState:  # stands for the DDP module and the loader the loop holds
        pass

    seen = {}

    def train(cfg):
        state = RunState()
        seen["state"] = weakref.ref(state)
        stop = raised()
        raise stop  # as the loop does: the frame holds `stop`, whose traceback holds the frame

    monkeypatch.setattr(dist, "shutdown",
                        lambda: seen.setdefault("alive_at_shutdown", seen["state"]() is not None))
    monkeypatch.setattr(sys, "argv", ["train.py", f"--train.out_dir={tmp_path}"])
    gc.disable()  # only the entry point's own collection may free the cycle
    try:
        assert cli.run_training("doc", "demo", train) == code
    finally:
        gc.enable()
    assert seen["alive_at_shutdown"] is False
    assert printed in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_with_one_line(tmp_path, tiny_args, monkeypatch, capsys):
    """While a run holds its folder (rank 0's lock on <out_dir>/.lock), another started on it stops at once
    with one line naming the holder; once the holder is gone (here: killed -9), the folder is free."""
    from ldm_ddp import cli

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ldm_ddp.resume import run_folder_lock\n"
        "with run_folder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"),
        str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = []
        monkeypatch.setattr(sys, "argv", ["train.py", *tiny_args(out)])
        assert cli.run_training("doc", "demo", started.append) == 2 and not started
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"config error: train.out_dir: {out} is in use by "
                                                     f"another run (pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait()
    assert cli.run_training("doc", "demo", started.append) == 0 and len(started) == 1


def meta_of(cfg: Config, **data) -> dict:
    """The metadata a checkpoint of `cfg` would carry (1 process, global batch 4, shapes fingerprint)."""
    return {"config": json.loads(json.dumps(cfg.to_dict())),
            "architecture": {"unet": {"block_out_channels": [16, 32]}},
            "world_size": 1, "versions": {**ckpt.versions(), "torch": "2.0.0"},
            "data": {"global_batch": 4, "fingerprint": "shapes:n=64", "seed": cfg.data.seed, **data}}


def test_resume_refuses_what_changes_the_state_and_records_the_rest(tmp_path, capsys):
    then, path = Config(), Path("step_0000100.safetensors")
    now = copy.deepcopy(then)
    now.optim.lr, now.train.max_steps, now.log.every = 1e-4, 5000, 7
    arch = {"unet": {"block_out_channels": [16, 32]}}
    changes = check_resumable(meta_of(then), now, arch, 4, "shapes:n=64", path)
    assert changes["config"] == {"optim.lr": [then.optim.lr, 1e-4],
                                 "train.max_steps": [then.train.max_steps, 5000],
                                 "log.every": [then.log.every, 7]}
    assert changes["versions"] == {"torch": ["2.0.0", torch.__version__]} and "world_size" not in changes
    record_resume(tmp_path, path, 100, changes)
    printed = capsys.readouterr().out
    assert ("changed since step_0000100.safetensors: optim.lr 0.003 -> 0.0001; train.max_steps 1200 -> 5000"
            in printed)
    assert json.loads((tmp_path / "resumes.jsonl").read_text())["config"]["log.every"] == [then.log.every, 7]

    refusals = [({"unet": {"block_out_channels": [16, 64]}}, 4, "shapes:n=64", {},
                 "model architecture changed: unet.block_out_channels [16, 32] in the checkpoint, "
                 "[16, 64] now"),
                (arch, 8, "shapes:n=64", {}, "global batch 4 in the checkpoint, 8 now"),
                (arch, 4, "shapes:n=65", {},
                 "data fingerprint shapes:n=64 in the checkpoint, shapes:n=65 now"),
                (arch, 4, "shapes:n=64", {"seed": 9}, "data.seed 9 in the checkpoint, 0 now"),
                (arch, 4, "shards:n=64", {"fingerprint": "shards:n=64", "shuffle_window": 2},
                 "data.shuffle_window 2 in the checkpoint, 8 now")]
    # A library upgrade adds or drops config entries: not a change of architecture.
    upgraded = {"unet": {"block_out_channels": [16, 32], "new_argument": None}, "text_encoder": {}}
    assert check_resumable(meta_of(then), now, upgraded, 4, "shapes:n=64", path)
    # The shuffle window orders only sharded sources: on others a change is allowed (and recorded).
    assert check_resumable(meta_of(then, shuffle_window=2), now, arch, 4, "shapes:n=64", path)
    for arch_now, batch, fingerprint, data, message in refusals:
        with pytest.raises(ConfigError, match=f"^step_0000100.safetensors: {re.escape(message)}"):
            check_resumable(meta_of(then, **data), now, arch_now, batch, fingerprint, path)


@pytest.mark.parametrize("init_is_torchrun", [False, True])
def test_an_orphaned_rank_stops_unless_init_is_its_launcher(init_is_torchrun, monkeypatch, tmp_path):
    """A rank whose parent is PID 1 at start lost its launcher (it stops), unless PID 1 is torchrun itself (a
    container started with torchrun as its command: its ranks are its children and must train)."""
    cmdline = tmp_path / "cmdline"  # what /proc/1/cmdline holds in either case
    cmdline.write_bytes(b"/usr/bin/python3\0/usr/local/bin/torchrun\0--standalone\0" if init_is_torchrun
                        else b"/sbin/init\0splash\0")
    assert faults._init_is_a_launcher(str(cmdline)) == init_is_torchrun
    sent = []
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(faults, "arm_parent_death_signal", lambda: True)  # not on the test process itself
    monkeypatch.setattr(faults, "_init_is_a_launcher", lambda: init_is_torchrun)
    monkeypatch.setattr(os, "getppid", lambda: 1)
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum))
    faults.end_with_launcher()
    assert sent == ([] if init_is_torchrun else [signal.SIGTERM])
