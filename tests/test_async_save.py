"""Saves in the background: the state is copied at its step, written while training goes on, and a kill
during the write leaves the previous checkpoint as the resume point."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO, script_env, train_here

from ldm_ddp import checkpoint
from ldm_ddp.saver import Saver


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_saver_writes_the_state_of_its_step_while_the_caller_goes_on(tmp_path):
    # a transposed (not contiguous) weight and a 0-d step count
    live = {"unet.w": torch.arange(6.0).reshape(2, 3).t(), "optim.w.step": torch.tensor(7.0)}
    release = threading.Event()
    raw = checkpoint.checkpoint_metadata(5, {})

    def job(host):
        release.wait(30)
        return checkpoint.commit_checkpoint(tmp_path, 5, host, raw)

    saver = Saver(background=True)
    stall = saver.start(5, live, job)
    assert stall < 5 and saver.busy() and saver.poll() is None  # the write waits; the caller does not
    with pytest.raises(RuntimeError, match="still in flight"):
        saver.start(6, live, job)
    live["unet.w"].mul_(-1)  # the next step changes the live state in place
    live["optim.w.step"].add_(1)
    release.set()
    outcome = saver.wait()
    assert outcome.error is None and outcome.step == 5 and set(outcome.timings) == {"stall", "to_host", "job"}
    tensors, meta = checkpoint.load_checkpoint(outcome.path)
    assert meta["step"] == 5
    assert torch.equal(tensors["unet.w"], torch.arange(6.0).reshape(2, 3).t())
    assert tensors["optim.w.step"].item() == 7.0
    assert saver.wait() is None and not saver.busy()  # an outcome is handed over once

    def failing(host):
        raise OSError(28, "No space left on device")
    saver.start(6, live, failing)
    outcome = saver.wait()
    assert isinstance(outcome.error, OSError) and outcome.path is None


@pytest.mark.slow
def test_background_and_inline_saves_hold_the_same_state(tmp_path, tiny_args):
    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / f"async_{mode}"
        train_here(*tiny_args(out, train__max_steps=6, ckpt__every=2, ckpt__async_save=mode))
        runs[mode] = out
    for step in (2, 4):
        name = checkpoint.checkpoint_path(".", step).name
        a, meta_a = checkpoint.load_checkpoint(runs["true"] / "checkpoints" / name)
        b, meta_b = checkpoint.load_checkpoint(runs["false"] / "checkpoints" / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert meta_a["ema"] == meta_b["ema"] and meta_a["optim"] == meta_b["optim"]
    # The last ended save's seconds reach the next record. The save at step 2 has ended by the one at step 4
    # (which waits for it), and a record is written before a save: by step 5 a record holds the save at 2 or,
    # if that one at 4 ended in time too, the one at 4 (the final save at 6 is followed by no record).
    saved = [r for r in records(runs["true"]) if "ckpt_step" in r]
    steps = [r["ckpt_step"] for r in saved]
    assert steps and set(steps) <= {2, 4} and steps == sorted(set(steps)) and saved[0]["step"] <= 5
    assert all(r["step"] > r["ckpt_step"] for r in saved)
    assert all(saved[0][f"ckpt_{k}_s"] >= 0 for k in ("stall", "to_host", "job"))


# Trains with saves every 4 steps; the write of step 8 stalls after its first tensors (its thread waits for
# the file `release`) while training goes on past it.
STALLED_WRITE = r"""
import json, os, sys, time
from ldm_ddp import checkpoint, faults
from ldm_ddp.config import load_config
from ldm_ddp.train_loop import train

marker, release = sys.argv[1], sys.argv[1] + ".release"
real = checkpoint.write_file

def write_file(tensors, path, raw, cancelled=lambda: False):
    calls = []
    def stall():
        calls.append(1)
        if "step_0000008" in path.name and len(calls) == 4:
            open(marker, "w").close()
            while not os.path.exists(release):
                time.sleep(0.01)
        return False
    return real(tensors, path, raw, stall)

checkpoint.write_file = write_file
try:
    train(load_config(overrides=json.loads(sys.argv[2])))
except faults.Stop as stop:
    print(stop, flush=True)
    sys.exit(stop.exit_code)
"""


def stalled_run(tmp_path, args):
    """-> the process, once the write of step 8 is stalled and training has reached step 10."""
    out, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITE, str(marker), json.dumps(args)], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (marker.exists() and (out / "metrics.jsonl").exists()
               and records(out)[-1]["step"] >= 10):  # training went on during the write
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read()[-3000:])
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path, tiny_args):
    out = tmp_path / "run"
    proc = stalled_run(tmp_path, tiny_args(out, train__max_steps=10_000, ckpt__every=4))
    try:
        temp = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        assert temp == [f".step_0000008.safetensors.tmp-{proc.pid}"]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_0000004.safetensors"]
    stdout = train_here(*tiny_args(out, train__max_steps=8, ckpt__every=4))
    assert "step_0000004.safetensors at step 4" in stdout
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["step_0000004.safetensors", "step_0000008.safetensors"]  # the temp file is gone
    checkpoint.load_checkpoint(out / "checkpoints" / "step_0000008.safetensors")


@pytest.mark.slow
def test_a_preemption_during_a_background_write_stops_on_that_save(tmp_path, tiny_args):
    """SIGTERM while the save of step 8 is still being written: the run waits for that save instead of
    writing another, exits 75 naming it, and the resumed run redoes the steps after it."""
    out = tmp_path / "run"
    proc = stalled_run(tmp_path, tiny_args(out, train__max_steps=10_000, ckpt__every=4))
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the ranks agree on the stop and wait for the write
        (tmp_path / "writing.release").touch()
        assert proc.wait(timeout=60) == 75
        printed = proc.stdout.read()
    finally:
        proc.kill()
    last = printed.strip().splitlines()[-1]
    assert last.startswith("preempted by SIGTERM at step 1")
    assert "checkpoint step_0000008.safetensors committed" in last
    names = [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")]
    assert names == ["step_0000004.safetensors", "step_0000008.safetensors"]
    stdout = train_here(*tiny_args(out, train__max_steps=12, ckpt__every=4))
    assert "step_0000008.safetensors at step 8" in stdout
    assert [r["step"] for r in records(out)][-4:] == [9, 10, 11, 12]  # the records past 8 set aside, redone
