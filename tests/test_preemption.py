"""A preempted run exits promptly, DataLoader workers on: SIGTERM to scripts/train.py, or to torchrun as a
scheduler sends it, ends every process within seconds of the signal whatever the number of workers, with a
committed checkpoint and exit code 75 (torchrun sends SIGKILL 30 s after its SIGTERM). And the piece that
makes it so: a loader's workers end at once when asked (stream.end_workers)."""

import multiprocessing
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, script_env
from test_faults import Launch, descendants, logged_step, wait_until

from ldm_ddp import checkpoint as ckpt
from ldm_ddp import faults
from ldm_ddp.data.stream import end_workers, make_loader
from ldm_ddp.faults import EXIT_PREEMPTED

EXIT_WITHIN = 10  # seconds from the signal to the end of the last process; torchrun's SIGKILL comes at 30


def preempted_checkpoint(output: str, out: Path) -> Path:
    """The checkpoint the stop names, verified (it loads)."""
    stopped = re.search(r"preempted by SIGTERM at step (\d+): checkpoint (\S+) committed", output)
    assert stopped, output[-3000:]
    path = out / "checkpoints" / stopped.group(2)
    ckpt.load_checkpoint(path)
    return path


def sigterm_and_time(launch: Launch, pids: list[int]) -> float:
    """SIGTERM to the launched process; -> seconds until it and `pids` (its descendants) have all ended."""
    sent = time.monotonic()
    launch.procs[0].send_signal(signal.SIGTERM)
    launch.wait(60)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 60, "every process to end")
    return time.monotonic() - sent


@pytest.mark.slow
def test_sigterm_with_four_data_workers_exits_75_within_10_s(tmp_path, tiny_args):
    out = tmp_path / "run"
    args = tiny_args(out, train__max_steps=1000, ckpt__every=1000, data__num_workers=4)
    cmd = [sys.executable, "scripts/train.py", *args]
    with Launch([cmd], [script_env()], [tmp_path / "run.log"]) as launch:
        wait_until(lambda: logged_step(launch.logs[0], 2), 120, "step 2", poll=0.01)
        workers = descendants(launch.procs[0].pid)
        assert len(workers) >= 4
        took = sigterm_and_time(launch, workers)
        assert launch.procs[0].returncode == EXIT_PREEMPTED, launch.output()[-3000:]
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after SIGTERM"
    preempted_checkpoint(launch.output(), out)


@pytest.mark.slow
def test_sigterm_to_torchrun_ends_both_ranks_with_75_within_10_s(tmp_path, tiny_args):
    """torchrun passes SIGTERM on to each rank's process group (workers included) and SIGKILLs what is left
    30 s later; both ranks save, exit 75 and are gone long before."""
    out = tmp_path / "run"
    args = tiny_args(out, train__max_steps=1000, ckpt__every=1000, data__num_workers=4)
    # Once signalled, torchrun exits 1 (it re-raises the signal as an exception) and does not say what its
    # ranks returned: a shell around each rank prints it (its trap only keeps it alive until the rank ends).
    shell = 'trap : TERM; "$@"; code=$?; echo "rank $RANK exited $code"; exit $code'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--no-python",
           "bash", "-c", shell, "rank", sys.executable, "scripts/train.py", *args]
    with Launch([cmd], [script_env()], [tmp_path / "torchrun.log"]) as launch:
        wait_until(lambda: logged_step(launch.logs[0], 2), 120, "step 2", poll=0.01)
        ranks_and_workers = descendants(launch.procs[0].pid)
        assert len(ranks_and_workers) >= 2 * (2 + 4)
        took = sigterm_and_time(launch, ranks_and_workers)
    text = launch.output()
    assert took < EXIT_WITHIN, f"exited {took:.1f} s after SIGTERM:\n{text[-3000:]}"
    assert "rank 0 exited 75" in text and "rank 1 exited 75" in text, text[-3000:]
    assert "forcefully exiting" not in text and launch.procs[0].returncode == 1  # torchrun SIGKILLed no rank
    preempted_checkpoint(text, out)


class Numbers(torch.utils.data.IterableDataset):
    """Endless one-element batches."""

    def __iter__(self):
        n = 0
        while True:
            yield torch.tensor([n])
            n += 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
@pytest.mark.parametrize("num_workers", [0, 4])
def test_end_workers_ends_every_worker_at_once(num_workers):
    before = set(multiprocessing.active_children())
    batches = iter(make_loader(Numbers(), num_workers, prefetch_batches=4, pin_memory=False,
                               worker_init_fn=faults.shield_worker))
    next(batches)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == num_workers
    start = time.monotonic()
    end_workers(batches)
    assert time.monotonic() - start < 2  # the loader's own timeout per worker is 5 s
    assert all(w.exitcode == 0 for w in workers)  # each ended by the loader's message, none killed
    assert not set(multiprocessing.active_children()) - before


@pytest.mark.slow
def test_the_launcher_exits_with_the_ranks_75_when_signalled_as_a_scheduler_does(tmp_path, tiny_args):
    """scripts/launch.py is torchrun with the ranks' exit code: SIGTERM to it, and the scheduler sees 75."""
    out = tmp_path / "run"
    args = tiny_args(out, train__max_steps=1000, ckpt__every=1000, data__num_workers=2)
    cmd = [sys.executable, "scripts/launch.py", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "scripts/train.py", *args]
    with Launch([cmd], [script_env()], [tmp_path / "launch.log"]) as launch:
        wait_until(lambda: logged_step(launch.logs[0], 2), 120, "step 2", poll=0.01)
        took = sigterm_and_time(launch, descendants(launch.procs[0].pid))
    text = launch.output()
    assert launch.procs[0].returncode == EXIT_PREEMPTED and took < EXIT_WITHIN, text[-3000:]
    preempted_checkpoint(text, out)


@pytest.mark.slow
def test_the_launcher_passes_a_ranks_failure_code_through(tmp_path, tiny_args, run_script):
    """A refused config (exit 2 on every rank): torchrun says 1, the launcher 2."""
    args = [*tiny_args(tmp_path / "run"), "--train.global_batch=3"]  # not a multiple of 2 ranks x 2
    launched = run_script("scripts/launch.py", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), "scripts/train.py", *args, timeout=120)
    assert launched.returncode == 2, launched.stderr[-2000:]
    assert "config error: train.global_batch" in launched.stderr
