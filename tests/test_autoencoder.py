"""Stage 1 (the VAE trainer) keeps the UNet trainer's fault contract through the shared run skeleton: a
non-finite step is skipped without touching the state, too many in a row stop the run with the last good state
saved, and a failed save follows ckpt.on_save_error."""

import errno
import json

import pytest
import torch

from ldm_ddp import autoencoder, checkpoint, dist
from ldm_ddp.checkpoint import list_checkpoints, load_checkpoint
from ldm_ddp.config import load_config
from ldm_ddp.faults import NonFiniteLimit, SaveFailed


def run_stage1(out, tiny_vae_json, **changes):
    values = {"model.vae_config": str(tiny_vae_json), "train.out_dir": str(out), "train.max_steps": 4,
              "train.precision": "fp32", "data.batch_per_gpu": 2, "data.resolution": 32,
              "data.num_workers": 0, "data.shapes_num_samples": 64, "ckpt.every": 1, "ckpt.keep": 10,
              "log.every": 1, "log.progress": "lines",
              **{k.replace("__", "."): v for k, v in changes.items()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return autoencoder.train_autoencoder(load_config(
            overrides=[f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]))
    finally:
        dist.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture
def poison_steps(monkeypatch):
    """-> a function(set of 1-based forward calls) making those reconstructions NaN (one forward per step)."""
    calls = []

    def poison(which: set):
        real = autoencoder.Reconstruction.forward

        def forward(self, images, noise):
            recon, kl = real(self, images, noise)
            calls.append(1)
            return (recon * float("nan"), kl) if len(calls) in which else (recon, kl)
        monkeypatch.setattr(autoencoder.Reconstruction, "forward", forward)
    return poison


@pytest.mark.parametrize("shard", ["off", "on"])
def test_a_non_finite_step_is_skipped_and_leaves_the_state(tmp_path, tiny_vae_json, poison_steps, shard):
    """Also with AdamW split over the ranks (train.shard_optimizer; one rank here): the same skip, saves in
    the same format."""
    poison_steps({2, 3})
    run_stage1(tmp_path / "run", tiny_vae_json, train__shard_optimizer=shard)
    ckpts = {int(p.stem.split("_")[1]): load_checkpoint(p)
             for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    assert sorted(ckpts) == [1, 2, 3, 4]
    (first, _), (third, meta) = ckpts[1], ckpts[3]
    assert any(k.startswith("optim.") for k in first)  # the moments, by parameter name
    assert all(torch.equal(first[k], third[k]) for k in first if k.startswith(("vae.", "optim.")))
    assert not torch.equal(ckpts[4][0]["vae.encoder.conv_in.weight"], third["vae.encoder.conv_in.weight"])
    assert meta["faults"]["skipped_steps"] == 2 and ckpts[4][1]["faults"]["skipped_in_a_row"] == 0
    assert (tmp_path / "run" / "bundle" / "vae" / "config.json").is_file()


def test_too_many_non_finite_steps_stop_with_the_last_good_state(tmp_path, tiny_vae_json, poison_steps):
    poison_steps({2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteLimit, match="2 steps in a row"):
        run_stage1(tmp_path / "run", tiny_vae_json, train__max_steps=8, train__max_consecutive_skips=2)
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept[-1].name == "step_0000003.safetensors"  # the stop's save: its state is step 1's
    last, _ = load_checkpoint(kept[-1])
    first, _ = load_checkpoint(kept[0])
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("vae."))


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_a_failed_save_follows_the_policy(tmp_path, tiny_vae_json, monkeypatch, policy):
    real = checkpoint.commit_checkpoint

    def save(ckpt_dir, step, *args):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device (writing a test file)")
        return real(ckpt_dir, step, *args)
    monkeypatch.setattr(checkpoint, "commit_checkpoint", save)
    out = tmp_path / "run"
    if policy == "stop":
        with pytest.raises(SaveFailed,
                           match="step_0000002.safetensors not saved .*step_0000001.safetensors stays"):
            run_stage1(out, tiny_vae_json, ckpt__on_save_error=policy)
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000001.safetensors"]
    else:
        run_stage1(out, tiny_vae_json, ckpt__on_save_error=policy)
        assert [int(p.stem.split("_")[1]) for p in list_checkpoints(out / "checkpoints")] == [1, 3, 4]
