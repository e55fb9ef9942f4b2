"""Held-out validation loss: a fixed set (its own seed, noise and timesteps), the same figure on one and two
ranks and across a resume, in the metrics record, console line and scalars."""

import pytest
import torch
from conftest import train_here
from test_train import check, metrics

from ldm_ddp.config import ConfigError, load_config


def test_the_set_its_noise_and_timesteps_are_fixed_and_cover_every_bucket(tiny_args, tmp_path):
    from ldm_ddp.conditioning import make_conditioning
    from ldm_ddp.models import build_unet, load_frozen
    from ldm_ddp.schedule import NoiseSchedule
    from ldm_ddp.validation import Validation

    cfg = load_config(overrides=tiny_args(tmp_path, val__every=2, val__num_samples=20))
    frozen = load_frozen(cfg.model.pretrained, "fp32", torch.device("cpu"))
    conditioning = make_conditioning(frozen)
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, True)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8, conditioning.width)
    cpu = torch.device("cpu")
    made = [Validation(cfg, frozen, conditioning, schedule, unet, cpu, False) for _ in range(2)]
    for name in ("latents", "noise", "t"):
        assert torch.equal(getattr(made[0], name), getattr(made[1], name)), name
    assert made[0].n == 20 and torch.bincount(made[0].t // 100).tolist() == [2] * 10
    cfg_raw = load_config(overrides=tiny_args(tmp_path, val__every=2, val__num_samples=20,
                                              val__weights="raw"))
    result = Validation(cfg_raw, frozen, conditioning, schedule, unet, cpu, False)(unet, None)
    assert len(result["val_loss_by_t"]) == 10 and all(v > 0 for v in result["val_loss_by_t"])
    assert result["val_loss"] == pytest.approx(sum(result["val_loss_by_t"]) / 10)  # 2 samples in each bucket
    assert result["val_weights"] == "raw" and result["val_s"] >= 0


def test_val_settings_are_checked(tiny_args, tmp_path):
    with pytest.raises(ConfigError, match="val.source: expected"):
        load_config(overrides=tiny_args(tmp_path, val__source="nope"))
    with pytest.raises(ConfigError, match="val.num_samples: expected a positive number"):
        load_config(overrides=tiny_args(tmp_path, val__num_samples=0))


@pytest.mark.slow
def test_the_figure_is_the_same_on_one_and_two_ranks_and_across_a_resume(tmp_path, tiny_args, run_script):
    """Training at lr 1e-30 leaves the weights as they start (an update that small rounds away), so one and
    two ranks validate the same weights: their figures agree. A run resumed at step 2 logs the same figures
    as one that never stopped."""
    same = {"optim__lr": 1e-30, "val__every": 2, "val__num_samples": 12, "val__weights": "raw",
            "train__max_steps": 2, "data__num_workers": 0}
    train_here(*tiny_args(tmp_path / "one", **same))
    check(run_script("scripts/train.py", *tiny_args(tmp_path / "two", data__batch_per_gpu=1, **same), nproc=2,
                     timeout=150))
    one, two = metrics(tmp_path / "one")[-1], metrics(tmp_path / "two")[-1]
    assert one["step"] == two["step"] == 2
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-6)
    assert one["val_loss_by_t"] == pytest.approx(two["val_loss_by_t"], rel=1e-6)

    common = {"val__every": 2, "val__num_samples": 12, "ckpt__every": 2, "log__every": 1}
    train_here(*tiny_args(tmp_path / "straight", train__max_steps=4, **common))
    train_here(*tiny_args(tmp_path / "resumed", train__max_steps=2, **common))
    stdout = train_here(*tiny_args(tmp_path / "resumed", train__max_steps=4, **common))
    assert "val " in stdout
    straight = [(r["step"], r.get("val_loss")) for r in metrics(tmp_path / "straight")]
    resumed = [(r["step"], r.get("val_loss")) for r in metrics(tmp_path / "resumed")]
    assert straight == resumed and [s for s, v in straight if v is not None] == [2, 4]
