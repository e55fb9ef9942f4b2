"""The run folder: probed for writing before any step, its layout said at start, one metrics timeline
across interrupted attempts, and a finished run that says there is nothing to do."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import train_here
from test_train import metrics

from ldm_ddp.config import ConfigError
from ldm_ddp.metrics import read_records, set_aside_records
from ldm_ddp.resume import check_writable


def probe_as_nobody(folder) -> str:
    """check_writable(folder) in a child that is user nobody (root may write anywhere) -> its message. A bare
    fork whose child runs a few system calls and leaves with os._exit: no multiprocessing machinery, whose
    locks a fork of this multi-threaded process can inherit held."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            check_writable(folder, "train.out_dir")
            os.write(write_end, b"written")
        except ConfigError as err:
            os.write(write_end, str(err).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "the probe did not finish"
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as f:
        return f.read().decode()


def test_a_folder_that_cannot_take_a_file_is_named_before_anything_runs(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    with pytest.raises(ConfigError, match=r"^train.out_dir: cannot write to .*a_file/run \(Not a directory"):
        check_writable(in_the_way / "run", "train.out_dir")
    # pytest's tmp_path is root's alone (0700): the folders nobody probes live in a folder anyone may enter
    base = Path(tempfile.mkdtemp(prefix="ldm_ddp_probe_"))
    try:
        os.chmod(base, 0o755)
        read_only, writable = base / "read_only", base / "writable"
        read_only.mkdir()
        writable.mkdir()
        os.chmod(read_only, 0o555)
        os.chmod(writable, 0o777)
        if os.geteuid() == 0:
            assert probe_as_nobody(writable) == "written"  # so the refusal below is the folder's mode
            message = probe_as_nobody(read_only)
        else:
            try:
                check_writable(read_only, "train.out_dir")
                message = "written"
            except ConfigError as err:
                message = str(err)
        assert message == f"train.out_dir: cannot write to {read_only} (Permission denied)"
        assert list(read_only.iterdir()) == [] and list(writable.iterdir()) == []
    finally:
        shutil.rmtree(base)
    check_writable(tmp_path / "new" / "checkpoints", "train.out_dir")  # made, probed, left empty
    assert list((tmp_path / "new" / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_train_refuses_an_unwritable_checkpoint_folder_with_one_line_before_a_step(tmp_path, tiny_args,
                                                                                   run_script):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    result = run_script("scripts/train.py", *tiny_args(out), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"config error: train.out_dir: cannot write to {out / 'checkpoints'} (File exists)"]
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_metrics_hold_one_timeline_after_an_interrupted_attempt(tmp_path, tiny_args):
    out = tmp_path / "run"
    printed = train_here(*tiny_args(out, train__max_steps=4, ckpt__every=2))
    layout = f"run folder {out}: checkpoints/ every 2 steps (last 3 kept), metrics.jsonl every 1 steps"
    assert layout in printed
    # An attempt killed after logging steps 5 and 6, before its step-6 save: resumed at 4, logs them again.
    path = out / "metrics.jsonl"
    records = metrics(out)
    with open(path, "a") as f:
        for step in (5, 6):
            f.write(json.dumps({**records[-1], "step": step, "loss": 99.0}) + "\n")
        f.write('{"step": 7, "lo')  # and a line the kill cut short
    assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4, 5, 6]

    train_here(*tiny_args(out, train__max_steps=6, ckpt__every=2))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 99.0 for r in metrics(out))
    superseded = [json.loads(line) for line in (out / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["superseded_at"]) for r in superseded] == [(5, 99.0, 4), (6, 99.0, 4)]

    printed = train_here(*tiny_args(out, train__max_steps=6, ckpt__every=2))  # finished: nothing to do
    assert "nothing to do: already at train.max_steps (6); raise it to train on" in printed
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_readers_of_an_older_folder_take_the_latest_attempt(tmp_path):
    """A file whose records double back (written before resumes set them aside): the later attempt wins."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": loss}) + "\n"
                            for s, loss in ((1, 1.0), (2, 0.9), (3, 0.8), (2, 0.7), (3, 0.6), (4, 0.5))))
    assert [(r["step"], r["loss"]) for r in read_records(path)] == [(1, 1.0), (2, 0.7), (3, 0.6), (4, 0.5)]
    set_aside_records(path, 3)
    assert [(r["step"], r["loss"]) for r in read_records(path)] == [(1, 1.0), (2, 0.7), (3, 0.6)]


@pytest.mark.slow
def test_every_replaced_sample_is_named_once_in_bad_samples_jsonl(tmp_path, tiny_args):
    """One example per log line; every replacement, with its step and reason, in bad_samples.jsonl (written
    with the saves, across a resume)."""
    from test_buckets import mixed_aspect_folder

    out = tmp_path / "run"
    args = dict(data__source="folder", data__path=mixed_aspect_folder(tmp_path / "images", bad=6),
                data__resolution=128, data__batch_per_gpu=4, ckpt__every=2)
    printed = train_here(*tiny_args(out, train__max_steps=2, **args))
    train_here(*tiny_args(out, train__max_steps=4, **args))
    records = metrics(out)
    replaced = sum(r["bad_samples"] for r in records)
    named = [json.loads(line) for line in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert replaced > 0 and len(named) == replaced
    assert all(r["key"].startswith("bad_") and r["reason"].startswith("UnidentifiedImageError")
               and r["rank"] == 0 for r in named)
    assert [r["step"] for r in named] == sorted(r["step"] for r in named)
    assert {r["step"] for r in named} <= {1, 2, 3, 4}
    lines = [line for line in printed.splitlines() if line.startswith("step ") and " bad 0" not in line]
    assert all(line.count("(e.g. bad_") == 1 for line in lines)
