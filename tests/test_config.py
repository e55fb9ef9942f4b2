"""Config: presets, `--section.key=value` overrides, --config files, one-line errors, --dry-run."""

import tomllib

import pytest
import torch

from ldm_ddp.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    resolve_batch,
    validate,
)


@pytest.mark.parametrize("preset", ["demo", "sd15_256", "sd15_512", "demo_vae"])
def test_presets_load_and_validate(preset):
    cfg = load_config(preset=preset)
    validate(cfg)
    assert cfg.train.out_dir == f"runs/{preset}"
    assert cfg.data.resolution % 8 == 0


def test_presets_set_their_recipe():
    assert load_config(preset="sd15_512").data.resolution == 512
    assert load_config(preset="sd15_256").data.resolution == 256
    assert load_config(preset="sd15_256").model.unet == "sd15"
    assert load_config(preset="demo").train.precision == "fp32"
    assert load_config(preset="demo_vae").data.batch_per_gpu == 64


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="no_such.*demo"):
        load_config(preset="no_such")


def test_overrides_parse_with_the_field_types():
    cfg = load_config(overrides=[
        "--data.batch_per_gpu=8", "--optim.lr=2e-4", "--optim.grad_clip=2", "--train.compile=regional",
        "--sample.weights=both", "--train.out_dir=/tmp/x y", "--optim.betas=[0.8, 0.95]",
        '--sample.prompts=["a cat", "a dog"]', "--model.frozen_dtype=bf16", "--ckpt.resume=none",
    ])
    assert cfg.data.batch_per_gpu == 8 and type(cfg.data.batch_per_gpu) is int
    assert cfg.optim.lr == 2e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.grad_clip == 2.0 and type(cfg.optim.grad_clip) is float  # an int is accepted for a float
    assert cfg.train.compile == "regional" and cfg.sample.weights == "both"
    assert cfg.train.out_dir == "/tmp/x y"
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.sample.prompts == ["a cat", "a dog"]
    assert cfg.model.frozen_dtype == "bf16" and cfg.ckpt.resume == "none"


def test_a_string_field_keeps_a_value_that_looks_like_a_number():
    cfg = load_config(overrides=["--train.out_dir=123", "--model.unet_init=", "--data.hf_split=1.5"])
    assert cfg.train.out_dir == "123" and cfg.data.hf_split == "1.5"


def test_config_file_applies_over_the_preset_and_overrides_over_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nbatch_per_gpu = 5\nnum_workers = 0\n[optim]\nlr = 3e-4\n'
                    '[train]\nout_dir = "from_file"\n')
    cfg = load_config(str(path), ["--optim.lr=1e-5"], preset="sd15_256")
    assert cfg.data.batch_per_gpu == 5 and cfg.data.num_workers == 0  # the file beats the preset
    assert cfg.data.resolution == 256 and cfg.model.unet == "sd15"  # the rest of the preset stays
    assert cfg.train.out_dir == "from_file"
    assert cfg.optim.lr == 1e-5  # the command line beats the file


def one_line_error(overrides=(), config_file=None, preset="demo") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config_file, list(overrides), preset=preset)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, key", [
    ("--nosection.lr=1", "nosection"),
    ("--optim.learning_rate=1", "optim.learning_rate"),
    ("--data.batch_per_gpu=abc", "data.batch_per_gpu"),
    ("--data.batch_per_gpu=2.5", "data.batch_per_gpu"),
    ("--train.precision=3", "train.precision"),
    ("--train.compile=yes", "train.compile"),
    ("--optim.lr=fast", "optim.lr"),
    ("--optim.betas=0.9", "optim.betas"),
    ('--optim.betas=["a", "b"]', "optim.betas"),
    ("--sample.prompts=[1, 2]", "sample.prompts"),
    ("--train.precision=fp16", "train.precision"),
    ("--log.wandb=maybe", "log.wandb"),
    ("--diffusion.beta_schedule=sigmoid", "diffusion.beta_schedule"),
    ("--data.num_workers=-1", "data.num_workers"),
    ("--train.max_steps=-5", "train.max_steps"),
    ("--data.batch_per_gpu=0", "data.batch_per_gpu"),
    ("--optim.lr=-1e-4", "optim.lr"),
    ("--optim.grad_clip=-1", "optim.grad_clip"),
    ("--ema.decay=1.0", "ema.decay"),
    ("--train.caption_dropout=1.5", "train.caption_dropout"),
    ("--data.resolution=60", "data.resolution"),
    ("--train.global_batch=-8", "train.global_batch"),
    ("--ema.update_every=0", "ema.update_every"),
    ("--sample.cfg_scale=0.5", "sample.cfg_scale"),
    ("--sample.guidance_rescale=1.5", "sample.guidance_rescale"),
    ("--sample.steps=1001", "sample.steps"),
    ("--train.compile=maybe", "train.compile"),
    ("--sample.weights=best", "sample.weights"),
    ("--train.layout_opt=on", "train.layout_opt"),  # a key this version does not have
    ("--optim.lr=inf", "optim.lr"), ("--optim.eps=nan", "optim.eps"),
    ("--train.startup_timeout_s=inf", "train.startup_timeout_s"),
    ("--ema.power_stds=[0.05, NaN]", "ema.power_stds"),
    ("--sample.prompts=[]", "sample.prompts"),
])
def test_bad_override_is_one_line_naming_the_key(override, key):
    assert key in one_line_error([override])


def test_override_without_a_section_is_refused():
    assert "--section.key=value" in one_line_error(["--lr=1"])


def test_bad_config_file_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 1e-4\nmomentum = 0.9\n")
    assert "optim.momentum" in one_line_error(config_file=str(path))
    path.write_text("[data]\nbatch_per_gpu = '32'\n")
    assert "data.batch_per_gpu" in one_line_error(config_file=str(path))
    path.write_text("[optimizer]\nlr = 1\n")
    assert "optimizer" in one_line_error(config_file=str(path))
    path.write_text("[data\n")
    assert "bad.toml" in one_line_error(config_file=str(path))


def test_resolve_batch_derives_grad_accum_from_the_global_batch():
    cfg = load_config(overrides=["--data.batch_per_gpu=4"])
    assert resolve_batch(cfg, 2) == (1, 8)
    cfg = load_config(overrides=["--data.batch_per_gpu=4", "--train.global_batch=32"])
    assert resolve_batch(cfg, 1) == (8, 32)
    assert resolve_batch(cfg, 2) == (4, 32)
    assert resolve_batch(cfg, 8) == (1, 32)


def test_global_batch_not_divisible_is_refused():
    cfg = load_config(overrides=["--data.batch_per_gpu=4", "--train.global_batch=32"])
    with pytest.raises(ConfigError, match="train.global_batch") as info:
        resolve_batch(cfg, 3)  # 32 is not a multiple of 4 * 3
    assert "\n" not in str(info.value)
    assert "train.global_batch" in one_line_error(["--data.batch_per_gpu=4", "--train.global_batch=30"])


def test_a_checkpoint_config_with_keys_of_another_release_still_reads():
    """Keys a checkpoint's config has and this version does not (dropped since) are ignored, not refused."""
    tree = Config().to_dict()
    tree["train"]["channels_last"] = True
    tree["ema"]["compile"] = False
    assert config_from_dict(tree) == Config()


def test_leading_spacing_takes_one_step_fewer():
    """sampling.ddim_timesteps' leading spacing starts one above a multiple of T // n: T steps would
    reach t = T."""
    assert "sample.steps" in one_line_error(["--sample.spacing=leading", "--sample.steps=1000"])
    assert load_config(overrides=["--sample.spacing=leading", "--sample.steps=999"]).sample.steps == 999
    assert load_config(overrides=["--sample.steps=1000"]).sample.steps == 1000  # trailing


def test_config_round_trips_through_its_dict():
    cfg = load_config(overrides=["--optim.betas=[0.8, 0.9]", "--train.max_steps=7"], preset="sd15_256")
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_dry_run_prints_toml_that_round_trips(tmp_path, run_script):
    args = ["--preset", "sd15_256", "--optim.lr=3e-5", "--train.out_dir=" + str(tmp_path / "run"),
            '--sample.prompts=["a \\"quoted\\" cat", "a dog"]', "--sample.weights=raw"]
    result = run_script("scripts/train.py", "--dry-run", *args, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = config_from_dict(tomllib.loads(result.stdout))
    validate(printed)
    expected = load_config(None, args[2:], preset="sd15_256")
    assert printed == expected
    assert printed.sample.prompts[0] == 'a "quoted" cat' and printed.optim.lr == 3e-5
    assert printed != Config()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_value_exits_2_with_one_line_and_does_no_work(tmp_path, run_script):
    out_dir = tmp_path / "run"
    result = run_script("scripts/train.py", "--data.batch_per_gpu=abc", f"--train.out_dir={out_dir}",
                        timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "data.batch_per_gpu" in lines[0]
    assert result.stdout == ""
    assert not out_dir.exists()


def test_min_snr_with_zero_terminal_snr_is_warned_about_and_the_presets_avoid_it():
    """min(SNR, gamma) / (SNR + 1) is 0 at SNR 0: with zero terminal SNR the noisiest timesteps would not
    train."""
    from ldm_ddp.config import warnings_for
    both = load_config(overrides=["--diffusion.min_snr_gamma=5", "--diffusion.zero_terminal_snr=true"])
    assert len(warnings_for(both)) == 1 and "diffusion.min_snr_gamma" in warnings_for(both)[0]
    assert not warnings_for(load_config(overrides=["--diffusion.min_snr_gamma=5",
                                                   "--diffusion.zero_terminal_snr=false"]))
    for preset in ("demo", "sd15_256", "sd15_512"):
        assert not warnings_for(load_config(preset=preset)), preset


def test_a_rank_without_its_gpu_is_refused_in_one_line(monkeypatch):
    """train.device=cuda without CUDA, and more processes on a node than it has GPUs (torchrun
    --nproc_per_node 8 on a 4-GPU node), are config errors naming the fix, not a CUDA traceback."""
    from ldm_ddp import dist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda was asked for"):
        dist.init("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError,
                       match=r"local rank 5 but the node has 4 visible GPU\(s\).*--nproc_per_node"):
        dist.init("cuda")
