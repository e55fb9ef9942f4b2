"""Training signals through the real entry point: per-block grad norms, MFU, the console summary, EMA and raw
side by side, several EMA profiles in the checkpoint, TensorBoard, wandb checkpoint artifacts offline."""

import re

import numpy as np
import pytest
from PIL import Image
from test_train import check, metrics

from ldm_ddp.checkpoint import load_checkpoint
from ldm_ddp.config import ConfigError, load_config


@pytest.mark.slow
def test_signals_side_by_side_profiles_tensorboard_and_artifacts(tmp_path, tiny_args, run_script):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_DIR": None, "WANDB_API_KEY": None, "WANDB_SILENT": "true",
           **{k: str(tmp_path / k.lower())
              for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}}
    args = tiny_args(out, train__max_steps=2, sample__every=2, sample__weights="both",
                     ema__extra_decays=[0.9], ema__power_stds=[0.1], log__tensorboard=True,
                     log__wandb="offline", log__wandb_checkpoints="reference")
    stdout = check(run_script("scripts/train.py", *args, env=env, timeout=180))

    records = metrics(out)
    groups = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
              "mid_block", "conv_norm_out", "conv_out"]
    for r in records:
        assert (list(r["grad_norm_by_block"]) == groups
                and all(v > 0 for v in r["grad_norm_by_block"].values()))
        # Block norms are taken before clipping, as grad_norm is: together they make up the total.
        assert (sum(v ** 2 for v in r["grad_norm_by_block"].values())
                == pytest.approx(r["grad_norm"] ** 2, rel=1e-4))
        assert r["tflops_per_gpu"] > 0 and "mfu" not in r  # MFU needs a peak: a CUDA device's
        assert r["skipped_steps"] == 0 and r["bad_samples"] == 0 and 0 <= r["data_wait_share"] <= 1
    lines = re.findall(r"^step +\d+  loss .*$", stdout, re.MULTILINE)
    assert len(lines) == 2 and all(re.search(r"\(max \S+ [\d.]+\) .* img/s \([\d.]+/GPU\) .* TFLOP/s/GPU  "
                                             r"data-wait \d+%  skipped 0  bad 0$", line) for line in lines)

    # EMA (left) and raw (right): two 2-image grids of 64 px with an 8 px gap; after two steps they differ.
    grid = np.asarray(Image.open(out / "samples" / "step_0000002.png"), dtype=np.int16)
    width = 2 * 66 + 2
    assert grid.shape == (66 + 2, 2 * width + 8, 3)
    assert np.all(grid[:, width:width + 8] == 255)
    assert np.abs(grid[:, :width] - grid[:, width + 8:]).max() > 0

    tensors, meta = load_checkpoint(out / "checkpoints" / "step_0000002.safetensors")
    assert [p["name"] for p in meta["ema"]["profiles"]] == ["ema", "ema:0.9", "ema:std=0.1"]
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "ema", "ema_0p9", "ema_std0p1", "optim"}

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert ({"loss", "tflops_per_gpu", "grad_norm/mid_block", "img_per_s_per_gpu"}
            <= set(events.Tags()["scalars"]))
    assert [e.step for e in events.Scalars("loss")] == [1, 2] and events.Tags()["images"] == ["samples"]

    run_id = (out / "wandb_id.txt").read_text().strip()
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = run_file.read_bytes()
    assert f"checkpoints-{run_id}".encode() in data and b"step_0000002.safetensors" in data
    # by reference
    assert (out / "checkpoints" / "step_0000002.safetensors").resolve().as_uri().encode() in data


@pytest.mark.parametrize("override, key", [("--ema.extra_decays=[1.5]", "ema.extra_decays"),
                                           ("--ema.power_stds=[0.5]", "ema.power_stds"),
                                           ("--log.wandb_checkpoints=always", "log.wandb_checkpoints"),
                                           ("--log.profile_at=-1", "log.profile_at")])
def test_bad_signal_settings_fail_before_any_work(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        load_config(overrides=[override])
