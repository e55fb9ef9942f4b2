"""Subprocess runs of the real entry points: train, resume bitwise under torchrun, accum + bf16, stage 1,
fallback."""

import json
import math
import re
import signal

import numpy as np
import pytest
import torch
from conftest import run_main, train_here
from PIL import Image

from ldm_ddp.checkpoint import list_checkpoints, load_checkpoint
from ldm_ddp.models import load_frozen


def check(result) -> str:
    """The run's stdout; fails with its output when it did not exit 0."""
    assert result.returncode == 0, (f"exit {result.returncode}\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result.stdout


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_bitwise_equal(path_a, path_b) -> None:
    a, meta_a = load_checkpoint(path_a)
    b, meta_b = load_checkpoint(path_b)
    assert meta_a["step"] == meta_b["step"] and meta_a["samples_seen"] == meta_b["samples_seen"]
    assert sorted(a) == sorted(b)
    groups = {prefix: [k for k in a if k.startswith(prefix)] for prefix in ("unet.", "ema.", "optim.")}
    assert all(groups.values()), {p: len(v) for p, v in groups.items()}
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert meta_a["ema"] == meta_b["ema"] and meta_a["optim"] == meta_b["optim"]


@pytest.mark.slow
def test_train_end_to_end(tmp_path, tiny_args, run_script, capsys):
    out = tmp_path / "run"
    stdout = check(run_script("scripts/train.py", *tiny_args(out, train__max_steps=4, sample__every=2,
                                                              data__num_workers=1, optim__lr=1e-3,
                                                              log__profile_at=1,
                                                              ), timeout=120))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000002.safetensors",
                                                                       "step_0000004.safetensors"]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("loss", "lr", "grad_norm", "img_per_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["img_per_s"] > 0 and r["bad_samples"] == 0
    assert [r["lr"] for r in records] == [5e-4, 1e-3, 1e-3, 1e-3]  # warmup over 2 steps, then constant
    assert len(re.findall(r"^step +\d+ +loss", stdout, re.MULTILINE)) == 4
    grid = out / "samples" / "step_0000004.png"
    assert grid.is_file() and (out / "samples" / "step_0000002.png").is_file()
    assert Image.open(grid).size[0] >= 2 * 64  # two 64 px samples side by side
    # log.profile_at: steps 2 and 3 under torch.profiler (the trace holds their UNet forward)
    summary = json.loads((out / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == 3 and summary["wall_ms_per_step"] > 0 and "profile: 3 steps" in stdout
    assert "aten::convolution" in (out / "profile" / "ops_rank0.txt").read_text()
    assert "Input Shapes" in (out / "profile" / "ops_by_shape_rank0.txt").read_text()
    assert '"traceEvents"' in (out / "profile" / "trace_rank0.json").read_text()
    _, meta = load_checkpoint(out / "checkpoints" / "step_0000004.safetensors")
    assert meta["step"] == 4 and meta["samples_seen"] == 8 and meta["data"]["global_batch"] == 2
    assert meta["config"]["train"]["max_steps"] == 4 and meta["world_size"] == 1
    capsys.readouterr()
    assert run_main("inspect_checkpoint", out / "checkpoints" / "step_0000004.safetensors") == 0
    report = capsys.readouterr().out
    assert "ldm_ddp/1" in report and "integrity     verified" in report and "unet.conv_in." in report
    assert run_main("inspect_checkpoint", "--json", out / "checkpoints" / "step_0000004.safetensors") == 0
    described = json.loads(capsys.readouterr().out)
    assert described["step"] == 4 and set(described["groups"]) >= {"unet", "ema", "optim"}


# grad_accum 1 is covered by the kill -9 and preemption resumes of test_faults.py.
@pytest.mark.slow
@pytest.mark.parametrize("grad_accum, steps", [(2, 4)])
def test_resume_under_torchrun_is_bitwise_identical(grad_accum, steps, tmp_path, tiny_args, run_script):
    """2 gloo ranks: `steps` in one go == steps/2, then the same command again with max_steps=steps, with
    gradient accumulation and DataLoader workers (a different number of them in each half): the same bits."""
    half = steps // 2
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = {"train__global_batch": 4 * grad_accum, "ckpt__every": half, "train__seed": 3,
              "ema__update_every": grad_accum}
    check(run_script("scripts/train.py",
                     *tiny_args(straight, train__max_steps=steps, data__num_workers=1, **common),
                     nproc=2, timeout=150))
    workers = 2 if grad_accum == 2 else 0
    first_half = tiny_args(resumed, train__max_steps=half, data__num_workers=workers, **common)
    check(run_script("scripts/train.py", *first_half, nproc=2, timeout=150))
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == [f"step_{half:07d}.safetensors"]
    stdout = check(run_script("scripts/train.py", *tiny_args(resumed, train__max_steps=steps, **common),
                              nproc=2, timeout=150))
    assert f"step_{half:07d}.safetensors at step {half}" in stdout
    final = f"step_{steps:07d}.safetensors"
    assert_bitwise_equal(straight / "checkpoints" / final, resumed / "checkpoints" / final)
    _, meta = load_checkpoint(straight / "checkpoints" / final)
    assert meta["world_size"] == 2 and meta["data"]["global_batch"] == 4 * grad_accum
    assert meta["samples_seen"] == steps * 4 * grad_accum
    assert meta["ema"]["num_updates"] == steps // grad_accum
    # Only rank 0 writes the log, and the reduced losses of the two runs agree step by step.
    assert [r["step"] for r in metrics(resumed)] == list(range(1, steps + 1))
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]


@pytest.mark.slow
def test_grad_accum_with_bf16_autocast(tmp_path, tiny_args):
    out = tmp_path / "run"
    train_here(*tiny_args(out, train__max_steps=2, train__global_batch=4, train__precision="bf16",
                          model__frozen_dtype="bf16"))
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["grad_norm"]) for r in records)
    tensors, meta = load_checkpoint(out / "checkpoints" / "step_0000002.safetensors")
    assert meta["samples_seen"] == 8
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k.startswith(("unet.", "ema.")))
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("unet."))


@pytest.mark.slow
def test_train_autoencoder_is_preempted_resumes_and_writes_a_loadable_bundle(tmp_path, tiny_vae_json,
                                                                             run_script):
    """Stage 1 with the UNet trainer's machinery: SIGTERM saves and exits 75, the same command resumes (and is
    refused with one line when the data order would change), and the end writes the bundle."""
    import subprocess
    import sys
    import time

    from conftest import REPO, script_env
    out = tmp_path / "vae"
    args = [f"--model.vae_config={tiny_vae_json}", f"--train.out_dir={out}", "--data.batch_per_gpu=2",
            "--data.resolution=32", "--data.num_workers=1", "--data.shapes_num_samples=64",
            "--log.every=1", "--log.progress=lines", "--ckpt.every=1000"]
    long_run = subprocess.Popen([sys.executable, "scripts/train_autoencoder.py", *args,
                                 "--train.max_steps=1000"],
                                cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and long_run.poll() is None, long_run.communicate()[0][-2000:]
        time.sleep(0.05)
    long_run.send_signal(signal.SIGTERM)
    text = long_run.communicate(timeout=60)[0]
    assert long_run.returncode == 75, text[-2000:]
    [saved] = list_checkpoints(out / "checkpoints")
    step = int(saved.stem.split("_")[1])
    refused = run_script("scripts/train_autoencoder.py", *args, f"--train.max_steps={step + 2}",
                         "--train.global_batch=4")
    assert (refused.returncode == 2
            and "global batch 2 in the checkpoint, 4 now" in refused.stderr + refused.stdout)
    stdout = check(run_script("scripts/train_autoencoder.py", *args, f"--train.max_steps={step + 2}",
                              timeout=150))
    assert f"resumed from {saved} at step {step}" in stdout
    bundle = out / "bundle"
    assert f"wrote {bundle}" in stdout
    assert {p.name for p in bundle.iterdir()} >= {"vae", "text_encoder", "tokenizer"}
    assert [r["step"] for r in metrics(out)][-2:] == [step + 1, step + 2]
    assert (out / "checkpoints" / f"step_{step + 2:07d}.safetensors").is_file()
    frozen = load_frozen(str(bundle), "fp32", torch.device("cpu"))
    assert list(frozen.vae.config.block_out_channels) == [8, 16] and frozen.downsample == 2
    assert frozen.scaling_factor != 1.0 and math.isfinite(frozen.scaling_factor)  # measured, not the default
    ids = frozen.tokenize(["a large red circle in the center"])
    context = frozen.encode_prompts(ids)
    assert context.shape == (1, ids.shape[1], 64)
    latents = frozen.encode_images(torch.zeros(1, 3, 32, 32), None)
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_args):
    out = tmp_path / "run"
    train_here(*tiny_args(out, train__max_steps=2, ckpt__every=1))
    newest = out / "checkpoints" / "step_0000002.safetensors"
    original = tmp_path / "original.safetensors"
    original.write_bytes(newest.read_bytes())
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0x01  # one bit in the last tensor's bytes
    newest.write_bytes(bytes(data))
    stdout = train_here(*tiny_args(out, train__max_steps=2, ckpt__every=1))
    assert "checkpoint refused: step_0000002.safetensors" in stdout
    assert "falling back to step_0000001.safetensors" in stdout
    assert "step_0000001.safetensors at step 1" in stdout
    # the first run's step 2 set aside (metrics.superseded.jsonl), then step 2 again: one timeline
    assert [r["step"] for r in metrics(out)] == [1, 2]
    superseded = (out / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded] == [2]
    # Step 2 redone from step 1 is the step 2 of the uninterrupted run, bit for bit (and verifies again).
    assert_bitwise_equal(original, newest)


@pytest.mark.slow
def test_resume_takes_the_new_optimizer_settings_and_a_fresh_start_sets_old_steps_aside(tmp_path, tiny_args):
    """A resume applies changed AdamW settings (allowed, recorded) instead of the checkpoint's; a run started
    with --ckpt.resume=none in the same folder moves the old run's checkpoints aside before its first save."""
    out = tmp_path / "run"
    train_here(*tiny_args(out, train__max_steps=2, optim__weight_decay=0.01))
    stdout = train_here(*tiny_args(out, train__max_steps=3, ckpt__every=1, optim__weight_decay=0.0,
                                   optim__betas=[0.9, 0.99]))
    assert "optim.weight_decay 0.01 -> 0.0" in stdout
    _, meta = load_checkpoint(out / "checkpoints" / "step_0000003.safetensors")
    assert meta["optim"][0]["weight_decay"] == 0.0 and meta["optim"][0]["betas"] == [0.9, 0.99]

    stdout = train_here(*tiny_args(out, train__max_steps=1, ckpt__every=1, ckpt__keep=1),
                        "--ckpt.resume=none")
    assert "this run starts at step 0: moved 2 later checkpoint(s)" in stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000001.safetensors"]
    _, meta = load_checkpoint(out / "checkpoints" / "step_0000001.safetensors")
    assert meta["samples_seen"] == 2  # this run's step 1, not the old run's
    [aside] = (out / "checkpoints").glob("superseded-*")
    assert [p.name for p in list_checkpoints(aside)] == ["step_0000002.safetensors",
                                                         "step_0000003.safetensors"]


@pytest.mark.slow
def test_live_samples_split_across_ranks_draw_the_same_grid(tmp_path, tiny_args, run_script):
    # A learning rate far below fp32 resolution keeps the weights at their (seeded) init, so the one-process
    # and two-process runs sample from identical weights; the grid must not depend on how prompts are split.
    prompts = ["a large red circle in the center", "a small blue square in the top left",
               "a large green triangle in the bottom right"]
    common = {"train__max_steps": 1, "sample__every": 1, "sample__prompts": prompts, "optim__lr": 1e-20,
              "optim__weight_decay": 0.0, "ckpt__every": 1}
    grids = []
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}"
        if nproc == 1:  # in this process
            train_here(*tiny_args(out, data__batch_per_gpu=4, **common))
        else:
            check(run_script("scripts/train.py", *tiny_args(out, data__batch_per_gpu=2, **common), nproc=2,
                             timeout=120))
        grids.append(np.asarray(Image.open(out / "samples" / "step_0000001.png"), dtype=np.int16))
    assert grids[0].shape == grids[1].shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 3 images in a 2 x 2 grid
    assert np.abs(grids[0] - grids[1]).max() <= 2  # batch composition may change float rounding, not images
    assert np.abs(grids[0][2:66, 2:66] - grids[0][2:66, 68:132]).max() > 20  # different prompts and seeds


@pytest.mark.slow
def test_compiled_ddp_trains_like_eager_ddp(tmp_path, tiny_args, run_script):
    """train.compile=full under torchrun (2 gloo ranks): one graph,
    DDP's reducer all-reducing after the backward. Compiled with the aot_eager backend (dynamo's capture and
    AOT autograd are real, inductor's kernels left out): losses and weights follow the eager DDP run's."""
    runs = {}
    for name, extra in (("eager", {"train__compile": "off"}),
                        ("whole", {"train__compile": "full"})):
        out = tmp_path / name
        stdout = check(run_script("scripts/train.py",
                                  *tiny_args(out, train__max_steps=3, ckpt__every=3, **extra),
                                  nproc=2, timeout=300, env={"LDM_DDP_COMPILE_BACKEND": "aot_eager"}))
        runs[name] = (metrics(out),
                      load_checkpoint(out / "checkpoints" / "step_0000003.safetensors")[0], stdout)
    (eager_log, eager, _), (log, compiled, stdout) = runs["eager"], runs["whole"]
    assert "failed at start" not in stdout
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in eager_log], rel=1e-5)
    unet_keys = [k for k in eager if k.startswith("unet.")]
    assert unet_keys and sorted(compiled) == sorted(eager)
    for key in unet_keys:  # three AdamW steps from the all-reduced gradients: the same weights up to rounding
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_runs_moments_and_ema_take_the_weights_channels_last_layout(tmp_path, tiny_args,
                                                                              monkeypatch):
    """On CUDA the UNet trains channels-last, and fused AdamW there refuses moments of other strides: the
    layout is set before the moments and EMA copies are made or loaded. Forced here on CPU, checked before
    every optimizer step of a run that resumes."""
    from ldm_ddp import ema, faults, models

    monkeypatch.setattr(models, "trains_channels_last", lambda device: True)
    layouts = []
    optimizer_step, ema_update = faults.optimizer_step, ema.EMA.update

    def checked_step(optimizer, ok, divisor=None):
        params = [p for group in optimizer.param_groups for p in group["params"] if p in optimizer.state]
        layouts.append(("moments", [(optimizer.state[p][k].stride(), p.stride())
                                    for p in params for k in ("exp_avg", "exp_avg_sq")]))
        return optimizer_step(optimizer, ok, divisor)

    def checked_update(self, module, ok=None):
        weights = dict(module.named_parameters())
        layouts.append(("ema", [(s.stride(), weights[n].stride())
                                for n, s in zip(self.names, self.shadows[0])]))
        return ema_update(self, module, ok)

    monkeypatch.setattr(faults, "optimizer_step", checked_step)
    monkeypatch.setattr(ema.EMA, "update", checked_update)
    train_here(*tiny_args(tmp_path / "run", train__max_steps=2))
    train_here(*tiny_args(tmp_path / "run", train__max_steps=4))
    assert [kind for kind, _ in layouts].count("moments") == 4 and [k for k, _ in layouts].count("ema") == 4
    # 3x3 convolutions' weights are channels-last (strides that no contiguous tensor of their shape has), and
    # every moment and shadow has its weight's strides
    assert any(len(w) == 4 and w[1] == 1 and w[2] > 1 for _, pairs in layouts for _, w in pairs)
    assert all(state == weight for _, pairs in layouts for state, weight in pairs)
