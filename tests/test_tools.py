"""The tools around training: sample.py, evaluate_demo.py (also on a damaged checkpoint), plot_metrics.py,
wandb offline; picking an EMA profile in sample.py, export_diffusers.py and inspect_checkpoint.py."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, run_main
from PIL import Image
from safetensors.torch import load_file
from test_train import check, metrics

from ldm_ddp.checkpoint import load_checkpoint, save_checkpoint
from ldm_ddp.export import export_diffusers
from ldm_ddp.models import load_trained


@pytest.mark.slow
def test_sample_and_evaluate_scripts(tmp_path, trained_run, run_script, capsys):
    """sample.py as a command; the other runs call the scripts' main() in process (no interpreter
    start-up)."""
    out = trained_run
    ckpt = out / "checkpoints" / "step_0000002.safetensors"
    prompts = ["--prompt", "a large red circle in the center", "--prompt",
               "a small blue square in the top left"]
    stdout = check(run_script("scripts/sample.py", ckpt, *prompts, "--n", "2", "--steps", "2",
                              "--out", tmp_path / "a.png", timeout=90))
    assert "4 images" in stdout  # (seeded sampling is deterministic: tests/test_sampling.py)
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 x 2 images of 64 px with 2 px padding
    assert not np.array_equal(grid[2:66, 2:66], grid[2:66, 68:132])  # seeds differ within a prompt
    raw = tmp_path / "raw.png"
    assert run_main("sample", ckpt, *prompts, "--n", "2", "--steps", "2", "--weights", "raw", "--out",
                    raw) == 0
    assert not np.array_equal(np.asarray(Image.open(raw)), grid)  # EMA and raw weights differ after 2 steps

    capsys.readouterr()
    assert run_main("evaluate_demo", ckpt, "--prompts", "64", "--steps", "2", "--json") == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["n"] == 64 and result["weights"] == "ema"
    assert all(0.0 <= result[k] <= 1.0 for k in ("colour", "shape", "size", "position", "all"))

    stdout = check(run_script("scripts/plot_metrics.py", out, "--out", tmp_path / "metrics.png", timeout=60))
    with Image.open(tmp_path / "metrics.png") as plot:
        assert "metrics.png" in stdout and plot.size[0] > 500

    # A damaged checkpoint: both tools refuse it with one line naming the file.
    damaged = tmp_path / "damaged" / ckpt.name
    damaged.parent.mkdir()
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for script, extra in (("sample", ["--prompt", "a red circle"]), ("evaluate_demo", [])):
        assert run_main(script, damaged, *extra) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "step_0000002.safetensors" in lines[0], lines

    # A checkpoint without UNet weights (a stage-1 VAE run's): refused, not sampled from a random UNet.
    from ldm_ddp.checkpoint import _RESERVED, load_checkpoint, save_checkpoint
    tensors, meta = load_checkpoint(ckpt)
    vae_only = save_checkpoint(tmp_path / "vae_only", 2, {k: v for k, v in tensors.items()
                                                          if not k.startswith(("unet.", "ema"))},
                               {k: v for k, v in meta.items() if k not in _RESERVED})
    for script, extra in (("sample", ["--prompt", "a red circle"]), ("evaluate_demo", [])):
        assert run_main(script, vae_only, *extra) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "no UNet weights" in lines[0], lines


@pytest.mark.slow
def test_wandb_offline_run_continues_after_restart(tmp_path, tiny_args, run_script):
    out = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_DIR": None, "WANDB_API_KEY": None, "WANDB_SILENT": "true"}
    check(run_script("scripts/train.py", *tiny_args(out, train__max_steps=2, log__wandb="offline"),
                     env=env, timeout=180))
    run_id = (out / "wandb_id.txt").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_id) == 8 and len(runs) == 1 and runs[0].name.endswith(run_id)
    assert any(runs[0].glob("*.wandb"))  # the offline run file, for `wandb sync`
    check(run_script("scripts/train.py", *tiny_args(out, train__max_steps=4, log__wandb="offline"),
                     env=env, timeout=180))
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    assert all(r.name.endswith(run_id) for r in (out / "wandb").glob("offline-run-*"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_wandb_files_go_to_wandb_dir_and_a_failed_online_start_says_it_goes_on_offline(tmp_path, monkeypatch,
                                                                                       capsys):
    wandb = pytest.importorskip("wandb")
    from ldm_ddp import metrics as metrics_module
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.UsageError("api_key not configured (no-tty)")
        return "run"

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "run_folder").mkdir()
    assert metrics_module.start_wandb("online", tmp_path / "run_folder", {}) == "run"
    assert [c["mode"] for c in calls] == ["online", "offline"]
    assert {c["dir"] for c in calls} == {str(tmp_path / "elsewhere")}
    said = capsys.readouterr().out
    assert "wandb online failed (UsageError: api_key not configured" in said
    assert "logging offline instead" in said
    monkeypatch.delenv("WANDB_DIR")
    calls.clear()
    (tmp_path / "other").mkdir()
    assert metrics_module.start_wandb("offline", tmp_path / "other", {}) == "run"
    assert [c["dir"] for c in calls] == [str(tmp_path / "other")]  # the run folder by default


def rewrite(ckpt, out_dir, change) -> str:
    """A copy of `ckpt` in out_dir after change(tensors, meta); -> its path."""
    tensors, meta = load_checkpoint(ckpt)
    change(tensors, meta)
    # the format's own keys
    meta = {k: v for k, v in meta.items() if k not in ("format", "step", "integrity")}
    return str(save_checkpoint(out_dir, 2, tensors, meta))


def add_profiles(tensors, meta) -> None:
    """Two more EMA profiles with known contents: ema:0.9 holds the raw weights, ema:std=0.1 the default
    EMA's."""
    names = [k[4:] for k in tensors if k.startswith("ema.")]
    tensors.update({f"ema_0p9.{n}": tensors[f"unet.{n}"].clone() for n in names})
    tensors.update({f"ema_std0p1.{n}": tensors[f"ema.{n}"].clone() for n in names})
    meta["ema"]["profiles"] += [{"name": "ema:0.9", "tensors": "ema_0p9", "decay": 0.9},
                                {"name": "ema:std=0.1", "tensors": "ema_std0p1", "std": 0.1, "gamma": 6.9372}]


@pytest.mark.slow
def test_pick_an_ema_profile_in_sample_export_and_inspect(tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    ckpt = rewrite(trained_run / "checkpoints" / "step_0000002.safetensors", tmp_path / "profiles",
                   add_profiles)
    tensors, _ = load_checkpoint(ckpt)
    for weights, prefix in (("raw", "unet"), ("ema", "ema"), ("ema:0.9", "unet"), ("ema:std=0.1", "ema")):
        _, unet, _ = load_trained(ckpt, weights, torch.device("cpu"))
        assert all(torch.equal(v, tensors[f"{prefix}.{k}"]) for k, v in unet.state_dict().items()), weights
    assert not torch.equal(tensors["unet.conv_in.weight"], tensors["ema.conv_in.weight"])
    assert run_main("sample", ckpt, "--prompt", "a large red circle in the center", "--n", "1",
                    "--steps", "2",
                    "--weights", "ema:std=0.1", "--out", tmp_path / "std.png") == 0
    assert Image.open(tmp_path / "std.png").size == (68, 68)
    capsys.readouterr()
    assert run_main("sample", ckpt, "--prompt", "a red circle", "--weights", "ema:0.5") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no EMA profile 'ema:0.5'" in error[0] and "ema:0.9, ema:std=0.1" in error[0]

    export_diffusers(ckpt, str(tmp_path / "export"), "fp32", "ema:0.9")
    exported = load_file(tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    # ema:0.9 holds the raw weights
    assert all(torch.equal(v, tensors[f"unet.{k}"]) for k, v in exported.items())

    capsys.readouterr()
    assert run_main("inspect_checkpoint", ckpt, "--no-verify") == 0
    report = capsys.readouterr().out
    assert "EMA profiles  2 updates" in report  # two steps, an EMA update each
    for line in ("ema            decay 0.995 with warmup", "ema:0.9        decay 0.9 with warmup",
                 "ema:std=0.1    power function, sigma_rel 0.1 (gamma 6.94)", "tensors ema_std0p1.*"):
        assert line in report, report
    assert run_main("inspect_checkpoint", ckpt, "--json") == 0
    described = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in described["ema_profiles"]] == ["ema", "ema:0.9", "ema:std=0.1"]


@pytest.mark.slow
def test_evaluate_demo_scores_any_ema_profile(tmp_path, trained_run, monkeypatch, capsys):
    """ema:0.9 of add_profiles holds the raw weights: the same images, so the same score as raw."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    ckpt = rewrite(trained_run / "checkpoints" / "step_0000002.safetensors", tmp_path / "profiles",
                   add_profiles)
    scores = {}
    for weights in ("raw", "ema:0.9"):
        capsys.readouterr()
        assert run_main("evaluate_demo", ckpt, "--prompts", "64", "--steps", "1", "--weights", weights,
                        "--json") == 0
        result = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert result["weights"] == weights
        scores[weights] = {k: result[k] for k in ("colour", "shape", "size", "position", "all")}
    assert scores["raw"] == scores["ema:0.9"]
    assert run_main("evaluate_demo", ckpt, "--weights", "ema:0.5") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no EMA profile 'ema:0.5'" in error[0]


@pytest.mark.slow
def test_a_checkpoint_from_before_ema_profiles_still_loads(tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))

    def drop_profiles(tensors, meta):
        del meta["ema"]["profiles"]

    old = rewrite(trained_run / "checkpoints" / "step_0000002.safetensors", tmp_path / "old", drop_profiles)
    _, unet, _ = load_trained(old, "ema:0.995", torch.device("cpu"))
    tensors, _ = load_checkpoint(old)
    assert torch.equal(unet.conv_in.weight, tensors["ema.conv_in.weight"])
    assert run_main("inspect_checkpoint", old, "--no-verify") == 0
    report = capsys.readouterr().out
    assert "ema            decay 0.995" in report and "ema:" not in report.split("tensor groups")[0]
