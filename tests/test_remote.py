"""Checkpoints mirrored to an fsspec URL (ckpt.remote): uploaded and verified, pruned there, resumed from on
a machine without them; an upload cut off never counts."""
import shutil
import uuid

import fsspec
import pytest
import torch
from conftest import train_here

from ldm_ddp import checkpoint, remote
from ldm_ddp.config import ConfigError


def remote_names(url) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []


@pytest.mark.slow
def test_a_fresh_machine_resumes_exactly_from_the_remote_copy(tmp_path, tiny_args):
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/run/checkpoints"
    first = tmp_path / "first"
    train_here(*tiny_args(first, train__max_steps=6, ckpt__every=2, ckpt__keep=2, ckpt__remote=url))
    assert remote_names(url) == ["step_0000004.safetensors", "step_0000006.safetensors"]  # kept: 2
    fs, root = fsspec.core.url_to_fs(url)
    for name in remote_names(url):  # the remote copies are the committed files, byte for byte
        assert fs.cat_file(f"{root}/{name}") == (first / "checkpoints" / name).read_bytes()

    shutil.rmtree(first)  # the machine is gone; a new one runs the same command
    stdout = train_here(*tiny_args(first, train__max_steps=8, ckpt__every=2, ckpt__keep=2, ckpt__remote=url))
    assert f"downloaded {url}/step_0000006.safetensors" in stdout
    assert "step_0000006.safetensors at step 6" in stdout
    assert remote_names(url) == ["step_0000006.safetensors", "step_0000008.safetensors"]

    straight = tmp_path / "straight"
    train_here(*tiny_args(straight, train__max_steps=8, ckpt__every=2))
    a, _ = checkpoint.load_checkpoint(first / "checkpoints" / "step_0000008.safetensors")
    b, _ = checkpoint.load_checkpoint(straight / "checkpoints" / "step_0000008.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_upload_cut_off_never_counts(tmp_path, tiny_args, monkeypatch):
    """A dead run's partial upload is removed and never resumed from; an upload whose copy fails to verify is
    retried, then reported under ckpt.on_save_error while the local checkpoint stays committed (the final
    save's only warns: the run ends as planned); a damaged remote copy is refused by name and the one before
    it is used."""
    url = (tmp_path / "bucket").as_uri()
    out = tmp_path / "run"
    train_here(*tiny_args(out, train__max_steps=4, ckpt__every=2, ckpt__remote=url))
    assert remote_names(url) == ["step_0000002.safetensors", "step_0000004.safetensors"]
    partial = tmp_path / "bucket" / ".step_0000006.safetensors.partial-host-123"
    partial.write_bytes((out / "checkpoints" / "step_0000004.safetensors").read_bytes()[:1000])

    # Every upload of step 6 arrives with one byte flipped: verified, refused, retried, given up.
    real_put = fsspec.implementations.local.LocalFileSystem.put_file
    attempts = []

    def flipping_put(self, lpath, rpath, **kwargs):
        real_put(self, lpath, rpath, **kwargs)
        if "step_0000006" in rpath or "step_0000008" in rpath:
            attempts.append(rpath)
            with open(rpath, "r+b") as f:
                f.seek(-50, 2)
                byte = f.read(1)
                f.seek(-50, 2)
                f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "put_file", flipping_put)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    stdout = train_here(*tiny_args(out, train__max_steps=8, ckpt__every=2, ckpt__remote=url,
                                   ckpt__on_save_error="continue", ckpt__keep=5))
    assert len(attempts) == 6
    assert ("step_0000006.safetensors not uploaded to " + url) in stdout
    assert "digest mismatch" in stdout and "after 3 attempts" in stdout
    assert "it is committed in" in stdout and "training goes on" in stdout
    assert stdout.strip().splitlines()[-1].startswith(  # the final save: a warning, and the run ends
        "warning: step_0000008.safetensors not uploaded to ")
    assert (out / "checkpoints" / "step_0000008.safetensors").is_file()  # committed here
    assert remote_names(url) == ["step_0000002.safetensors", "step_0000004.safetensors"]  # no partial left

    # The newest remote copy is damaged and this machine has nothing: refused, and step 2 is used.
    monkeypatch.undo()
    damaged = tmp_path / "bucket" / "step_0000004.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 1
    damaged.write_bytes(bytes(data))
    shutil.rmtree(out)
    stdout = train_here(*tiny_args(out, train__max_steps=4, ckpt__every=2, ckpt__remote=url))
    assert f"remote checkpoint refused: {url}/step_0000004.safetensors" in stdout
    assert "step_0000002.safetensors at step 2" in stdout


@pytest.mark.slow
def test_a_fresh_start_sets_the_remote_later_steps_aside(tmp_path, tiny_args):
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/run"
    train_here(*tiny_args(tmp_path / "old", train__max_steps=4, ckpt__every=2, ckpt__remote=url))
    stdout = train_here(*tiny_args(tmp_path / "new", train__max_steps=2, ckpt__every=2, ckpt__remote=url,
                                   ckpt__resume="none"))
    assert "moved 2 later remote checkpoint(s)" in stdout
    (aside,) = [name for name in remote_names(url) if name.startswith("superseded-")]
    assert remote_names(f"{url}/{aside}") == ["step_0000002.safetensors", "step_0000004.safetensors"]
    assert [n for n in remote_names(url) if n.startswith("step_")] == ["step_0000002.safetensors"]


@pytest.mark.parametrize("kind", ["not a folder", "unknown protocol"])
def test_an_unusable_remote_is_refused_before_any_step(tmp_path, tiny_args, kind):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url, says = ((blocker / "checkpoints").as_uri(), "cannot write to file://") if kind == "not a folder" \
        else ("nosuchstore://bucket/run", "cannot use nosuchstore://bucket/run")
    with pytest.raises(ConfigError, match=f"ckpt.remote: {says}"):
        train_here(*tiny_args(tmp_path / "run", ckpt__remote=url))
