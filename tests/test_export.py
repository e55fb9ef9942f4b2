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


def test_exported_pipeline_samples_a_non_square_image_as_the_sample_script(tmp_path, trained_run):
    """height= and width= of the pipeline: with the same initial noise, its 128x64 images are those
    scripts/sample.py writes at --width 128 --height 64 (the demo VAE downsamples by 8: a 16x8 latent)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ldm_ddp.export import export_diffusers
    from ldm_ddp.sampling import initial_noise

    ckpt = trained_run / "checkpoints" / "step_0000002.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(export_diffusers(str(ckpt), str(tmp_path / "fp32"),
                                                                    "fp32"))
    prompts, seed = ["a large red circle in the center", "a small blue square in the top left"], 3
    assert run_main("sample", ckpt, *[a for p in prompts for a in ("--prompt", p)], "--n", "1",
                    "--seed", seed, "--steps", "8", "--cfg", "3.0", "--rescale", "0.7",
                    "--spacing", "trailing", "--width", "128", "--height", "64",
                    "--out", tmp_path / "ours.png") == 0
    ours = np.asarray(Image.open(tmp_path / "ours.png"), dtype=np.int16)
    assert ours.shape == (2 * 66 + 2, 130 + 2, 3)  # a row per prompt, 2 px padding

    noise = initial_noise([seed, seed + 1], (pipe.unet.config.in_channels, 64 // 8, 128 // 8))
    theirs = pipe(prompts, height=64, width=128, latents=noise, num_inference_steps=8, guidance_scale=3.0,
                  guidance_rescale=0.7, output_type="np").images
    assert theirs.shape == (2, 64, 128, 3)
    for k in range(2):  # 8-bit pixels of both: rounding may differ by one level where a value sits at a half
        cell = ours[2 + k * 66: 2 + k * 66 + 64, 2:130]
        assert np.abs(cell - np.round(theirs[k] * 255)).max() <= 1, k
    assert np.abs(ours[2:66, 2:130] - ours[68:132, 2:130]).max() > 20  # the prompts' images differ


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


@pytest.mark.slow
def test_the_readme_snippet_runs_on_every_export_dtype(tmp_path, trained_run):
    """README's diffusers snippet, as printed (on the CPU, 2 steps), on fp16 (the default), bf16 and fp32
    exports, with its torch_dtype and without one."""
    import re
    from pathlib import Path

    from ldm_ddp.export import export_diffusers

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?from_pretrained.*?)```", readme, re.S).group(1)
    assert 'from_pretrained("export/", torch_dtype=torch.float16).to("cuda")' in snippet
    on_cpu = snippet.replace('.to("cuda")', '.to("cpu")').replace("num_inference_steps=25",
                                                                 "num_inference_steps=2")
    ckpt = trained_run / "checkpoints" / "step_0000002.safetensors"
    for dtype in ("fp16", "bf16", "fp32"):
        folder = export_diffusers(str(ckpt), str(tmp_path / dtype), dtype)
        for code in (on_cpu, on_cpu.replace(", torch_dtype=torch.float16", "")):
            scope = {}
            exec(code.replace('"export/"', repr(str(folder))), scope)  # noqa: S102
            image = scope["image"]
            assert image.size == (64, 64), (dtype, code)
            pipe = scope["pipe"]
            want = torch.float16 if "torch_dtype" in code else torch.float32
            assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {want}, (dtype, code)
