"""Chaos run: a few hundred steps of a tiny model under random SIGKILL, SIGTERM and SIGUSR1, compared bit for
bit with a run that was never interrupted.

    python scripts/chaos.py --out runs/chaos [--steps 300] [--faults 12] [--seed 0]

Every attempt is the same command, `torchrun --nproc_per_node 2 scripts/train.py ...` (CPU, gloo, one
DataLoader worker per rank, live sampling, a checkpoint every 25 steps), in one run folder. While an attempt
runs, one fault is injected: at a random moment (during startup, a step, sampling or a save) or, for
"kill -9 in a save", while rank 0 has a checkpoint's temporary file open. Then the same command runs again,
until an attempt finishes. Prints one line per fault and a summary: faults by kind, steps lost (steps done
before a fault and redone after it), wall time, and whether the final UNet, EMA and optimizer state equal
the uninterrupted run's. Exit code 0 only if they do and every preemption committed a checkpoint within 20 s.
"""
import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import _path  # noqa: F401
import torch

from ldm_ddp import checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [16, 32],
             "layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 8}
KINDS = ("kill -9 a rank", "kill -9 in a save", "SIGTERM to torchrun", "SIGTERM to a rank",
         "SIGUSR1 to a rank")


def train_args(out: Path, steps: int, unet_json: Path) -> list[str]:
    values = {"model.unet": str(unet_json), "train.out_dir": str(out), "train.max_steps": steps,
              "train.seed": 3, "train.precision": "fp32", "data.batch_per_gpu": 2, "data.num_workers": 1,
              "data.shapes_num_samples": 256, "optim.schedule": "cosine", "optim.warmup_steps": 10,
              "ckpt.every": 25, "ckpt.keep": 3, "log.every": 1, "log.progress": "lines", "sample.every": 100,
              "sample.steps": 4, "sample.prompts": '["a large red circle in the center"]'}
    return [f"--{k}={v}" for k, v in values.items()]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """The same command every time (each on a fresh port; torchrun starts each worker in its own session)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "scripts/train.py", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def worker_pid(launcher: int, rank: int) -> int | None:
    """torchrun's worker of `rank`: its child whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() \
                    and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher \
                    and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
    return None


def logged_steps(out: Path) -> list[int]:
    """Every step logged so far, by all attempts in turn
    (rank 0 logs each step; a killed write may be cut)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.startswith("{") and line.endswith("}")]


def last_step(out: Path) -> int:
    return max(logged_steps(out), default=0)


def wait_for_worker(proc: subprocess.Popen, rank: int, deadline: float) -> int | None:
    while proc.poll() is None and time.monotonic() < deadline:
        if pid := worker_pid(proc.pid, rank):
            return pid
        time.sleep(0.01)
    return None


def wait_for_exit_of_all(out: Path, timeout: float = 60.0) -> None:
    """No process of an attempt may outlive it (it would write into the next one's run folder). The caller and
    its ancestors are not an attempt's, even where their command lines name `out`."""
    deadline = time.monotonic() + timeout
    ours = _ancestors()
    while True:
        left = [int(e.name) for e in Path("/proc").iterdir()
                if e.name.isdigit() and int(e.name) not in ours and _cmdline_has(e, str(out))]
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _ancestors() -> set[int]:
    """This process and its ancestors."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _cmdline_has(entry: Path, text: str) -> bool:
    try:
        return text.encode() in (entry / "cmdline").read_bytes()
    except OSError:
        return False


def inject(proc: subprocess.Popen, out: Path, kind: str, rng: random.Random, deadline: float,
           steps: int) -> tuple[str, float]:
    """Wait for a random moment (or a save), then inject `kind`.
    -> (where it landed, when), ("", 0) if it ended."""
    start = last_step(out)
    if kind == "kill -9 in a save":
        pid = wait_for_worker(proc, 0, deadline)  # looked up first:
        # the kill must follow the temp file at once
        ours = f".safetensors.tmp-{pid}"  # not one an earlier attempt left behind
        while pid and proc.poll() is None and time.monotonic() < deadline:
            if temp := next((out / "checkpoints").glob(f".step_*{ours}"), None):
                os.kill(pid, signal.SIGKILL)
                name = temp.name[1:].split(".tmp-")[0]  # .step_0000300.safetensors.tmp-PID
                late = " (too late: it had committed)" if (out / "checkpoints" / name).exists() else ""
                return f"rank 0 writing {name}{late}", time.time()
            time.sleep(0.002)
        return "", 0.0
    # A moment: during startup (before step 1 of this attempt) a quarter of the time, else after 1-40 steps
    # plus a fraction of one, so it lands in a step, a log line, live sampling or a periodic save.
    after = 0 if rng.random() < 0.25 else rng.randint(1, max(1, min(40, steps - start - 3)))
    delay = rng.uniform(0.5, 6.0) if after == 0 else rng.uniform(0.0, 0.3)
    rank = rng.randint(0, 1)
    pid = wait_for_worker(proc, rank, deadline)  # a launcher killed before its workers start
    # would orphan them
    while proc.poll() is None and after and last_step(out) < start + after and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None or pid is None:
        return "", 0.0
    where = f"at step {last_step(out)}" if after else f"{delay:.1f} s after launch (startup)"
    if kind == "SIGTERM to torchrun":
        proc.send_signal(signal.SIGTERM)
        return where, time.time()
    os.kill(pid, {"kill -9 a rank": signal.SIGKILL, "SIGTERM to a rank": signal.SIGTERM,
                  "SIGUSR1 to a rank": signal.SIGUSR1}[kind])
    return f"{where}, rank {rank}", time.time()


def compare(path_a: Path, path_b: Path) -> list[str]:
    """Tensors and state metadata that differ between two checkpoints (empty: bitwise equal)."""
    a, meta_a = checkpoint.load_checkpoint(path_a)
    b, meta_b = checkpoint.load_checkpoint(path_b)
    differ = [k for k in sorted(a.keys() | b.keys())
              if k not in a or k not in b or not torch.equal(a[k], b[k])]
    differ += [k for k in ("step", "samples_seen", "ema", "optim", "faults")
               if meta_a.get(k) != meta_b.get(k)]
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chaos", help="folder for both runs and the logs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--faults", type=int, default=12, help="faults to inject before the run may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attempt-timeout", type=float, default=600.0,
                        help="s; one attempt is killed after this")
    args = parser.parse_args()
    rng, root, began = random.Random(args.seed), Path(args.out).resolve(), time.time()
    root.mkdir(parents=True, exist_ok=True)
    unet_json = root / "tiny_unet.json"
    unet_json.write_text(json.dumps(TINY_UNET))
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    # Both runs from scratch, every time: a finished run left here would resume with no fault to inject, and a
    # reference left by earlier code would compare against that code.
    reference, run = root / "reference", root / "chaos"
    for folder in (reference, run):
        shutil.rmtree(folder, ignore_errors=True)
    proc = launch(train_args(reference, args.steps, unet_json), logs / "reference.log")
    try:
        failed = proc.wait(timeout=args.attempt_timeout * 2) != 0
    except subprocess.TimeoutExpired:
        proc.kill()
        wait_for_exit_of_all(reference, timeout=0)
        failed = True
    if failed:
        print(f"the uninterrupted run failed or timed out: see {logs / 'reference.log'}")
        return 1
    print(f"reference: {args.steps} steps uninterrupted ({time.time() - began:.0f} s)", flush=True)

    # Every kind as often as the others, in a random order.
    plan = [KINDS[i % len(KINDS)] for i in range(args.faults)]
    rng.shuffle(plan)
    injected, lost, late, attempt = Counter(), 0, [], 0
    chaos_began = time.time()
    while True:
        attempt += 1
        log = logs / f"attempt_{attempt:03d}.log"
        done_before = logged_steps(run)
        proc = launch(train_args(run, args.steps, unet_json), log)
        deadline = time.monotonic() + args.attempt_timeout
        kind, where, sent = "", "", 0.0
        if plan:
            kind = plan.pop()
            where, sent = inject(proc, run, kind, rng, deadline, args.steps)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            wait_for_exit_of_all(run, timeout=0)  # and its workers, in sessions of their own
            print(f"attempt {attempt}: still running after {args.attempt_timeout} s, killed; see {log}")
            return 1
        wait_for_exit_of_all(run)
        reached = last_step(run)
        # Lost work: steps this attempt did that an earlier one had done already (redone after a fault).
        lost += sum(step <= max(done_before, default=0) for step in logged_steps(run)[len(done_before):])
        if code == 0 and reached >= args.steps:
            break
        if not where:
            print(f"attempt {attempt}: exit {code} without a fault; see {log}")
            return 1
        injected[kind] += 1
        note = ""
        if preempted := re.search(r"preempted by \w+ at step (\d+)", log.read_text()):
            saved = checkpoint.checkpoint_path(run / "checkpoints", int(preempted[1]))
            commit_s = max(0.0, saved.stat().st_mtime - sent) if saved.exists() else float("inf")
            note = f", preempted: step {preempted[1]} committed {commit_s:.1f} s after the signal"
            if commit_s > 20:
                late.append(attempt)
        workers = re.findall(r"exitcode\s*:\s*(-?\d+)", log.read_text())  # torchrun's failure report
        codes = f"torchrun exit {code}" + (f", workers {'/'.join(workers)}" if workers else "")
        print(f"attempt {attempt}: {kind} {where}: {codes}; reached step {reached}{note}", flush=True)

    differ = compare(checkpoint.checkpoint_path(reference / "checkpoints", args.steps),
                     checkpoint.checkpoint_path(run / "checkpoints", args.steps))
    total = sum(injected.values())
    print(f"\nfaults injected: {total} ({', '.join(f'{n} {k}' for k, n in injected.items())})")
    print(f"attempts: {attempt}; steps lost (done before a fault, redone after): {lost} of {args.steps}")
    print(f"preemption checkpoints later than 20 s: {len(late)}")
    print("final state vs the uninterrupted run: "
          f"{'bitwise equal' if not differ else 'DIFFERENT: ' + ', '.join(differ[:5])}")
    print(f"wall time: {time.time() - chaos_began:.0f} s with faults, {time.time() - began:.0f} s in all")
    if total < args.faults:  # the run reached its end before every planned fault found its moment
        print(f"only {total} of the {args.faults} faults asked for were injected: use more --steps")
    return 0 if not differ and not late and total == args.faults else 1


if __name__ == "__main__":
    sys.exit(main())
