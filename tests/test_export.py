"""Export to a diffusers pipeline: it loads without missing parts and samples like our own sampler."""

import logging

import pytest
import torch
from conftest import run_main, train_here
from test_train import check

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_exported_pipeline_matches_our_sampler(tmp_path, trained_run, run_script, caplog):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from ldm_ddp.models import load_trained
    from ldm_ddp.sampling import generate, initial_noise
    from ldm_ddp.schedule import NoiseSchedule

    ckpt = trained_run / "checkpoints" / "step_0000002.safetensors"
    half, full = tmp_path / "half", tmp_path / "full"
    check(run_script("scripts/export_diffusers.py", ckpt, half, timeout=120))
    assert run_main("export_diffusers", ckpt, full, "--dtype", "fp32") == 0  # in process
    assert {t.dtype for t in load_file(half / "unet" / "diffusion_pytorch_model.safetensors").values()} == \
        {torch.float16}

    with caplog.at_level(logging.WARNING):
        pipe = StableDiffusionPipeline.from_pretrained(full)
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()
                or "not initialized" in r.getMessage().lower()]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (pipe.scheduler.config.rescale_betas_zero_snr
            and pipe.scheduler.config.timestep_spacing == "trailing")

    cfg, unet, frozen = load_trained(str(ckpt), "ema", torch.device("cpu"))
    d = cfg.diffusion
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    prompts, seeds = ["a large red circle in the center", "a small blue square in the top left"], [3, 4]
    ours = generate(unet, frozen, schedule, prompts, seeds, 8, 3.0, 0.7, "trailing", autocast=False)
    noise = initial_noise(seeds, (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size))
    theirs = pipe(prompts, latents=noise, num_inference_steps=8, guidance_scale=3.0, guidance_rescale=0.7,
                  output_type="pt").images * 2 - 1
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_the_exported_scheduler_visits_our_timesteps(spacing):
    """StableDiffusionPipeline enforces steps_offset=1, which shifts "leading" spacing: ours is SD's original
    leading spacing (with the offset), so the exported pipeline and sampling.ddim_sample visit the same t."""
    from ldm_ddp.config import load_config
    from ldm_ddp.export import scheduler_for
    from ldm_ddp.sampling import ddim_timesteps
    cfg = load_config(overrides=[f"--sample.spacing={spacing}", "--diffusion.zero_terminal_snr=false"])
    scheduler = scheduler_for(cfg)
    for n in (7, 25, 50):
        scheduler.set_timesteps(n)
        assert torch.equal(scheduler.timesteps,
                           ddim_timesteps(cfg.diffusion.num_train_timesteps, n, spacing)), n


def test_export_writes_the_pretrained_frozen_weights_not_their_bf16_rounding(tmp_path, tiny_args):
    """A run with model.frozen_dtype=bf16 (the sd15 presets') trains with a bf16 VAE and text encoder; its
    fp32 export holds the pretrained fp32 weights themselves."""
    from diffusers import StableDiffusionPipeline

    from ldm_ddp.config import load_config
    from ldm_ddp.export import export_diffusers
    from ldm_ddp.models import load_frozen

    out = tmp_path / "run"
    train_here(*tiny_args(out, train__max_steps=1, ckpt__every=1, model__frozen_dtype="bf16"))
    export_diffusers(str(out / "checkpoints" / "step_0000001.safetensors"), str(tmp_path / "fp32"), "fp32")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "fp32")
    pretrained = load_frozen(load_config(overrides=tiny_args(out)).model.pretrained, "fp32",
                             torch.device("cpu"))
    rounded = 0
    for ours, theirs in ((pretrained.vae, pipe.vae), (pretrained.text_encoder, pipe.text_encoder)):
        theirs_state = theirs.state_dict()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs_state[key]), key
            rounded += not torch.equal(value, value.bfloat16().float())
    assert rounded  # bf16 would have changed these: the comparison can tell the two apart
