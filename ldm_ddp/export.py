"""Inference export: a training checkpoint -> a diffusers `StableDiffusionPipeline` folder
(`StableDiffusionXLPipeline` for model.kind = "sdxl").

The folder holds the chosen UNet weights (the default EMA, another EMA profile, or raw) in half precision by
default, the run's VAE, text encoder and tokenizer, and a `DDIMScheduler` config equivalent to our schedule
and sampler: v-prediction, the run's betas, zero-terminal-SNR and timestep spacing, no clipping. The
pipeline's own defaults (50 steps, guidance 7.5, no guidance rescale) are not the run's `sample.*` settings:
pass num_inference_steps, guidance_scale and guidance_rescale to sample as scripts/sample.py does. For a few
step counts (e.g. 61, 103 of 1000 "trailing") diffusers' float spacing gives one step more, ending at t = -1.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from .config import Config
from .models import DTYPES, load_trained

EXPORT_DTYPES = {"fp16": torch.float16, **DTYPES}


def scheduler_for(cfg: Config) -> DDIMScheduler:
    """The diffusers scheduler that samples as sampling.ddim_sample does with this run's config."""
    d = cfg.diffusion
    beta_schedule = {"cosine": "squaredcos_cap_v2"}.get(d.beta_schedule, d.beta_schedule)
    # steps_offset=1 is what StableDiffusionPipeline forces; it shifts "leading" timesteps by one, as our
    # leading spacing does (SD's original), and does nothing to "trailing":
    # the exported sampler visits our timesteps.
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                         beta_end=d.beta_end, beta_schedule=beta_schedule,
                         rescale_betas_zero_snr=d.zero_terminal_snr, prediction_type="v_prediction",
                         timestep_spacing=cfg.sample.spacing,
                         clip_sample=False, set_alpha_to_one=True, steps_offset=1)


def export_diffusers(checkpoint: str, out_dir: str, dtype: str = "fp16", weights: str = "ema") -> Path:
    """Write a StableDiffusionPipeline (or StableDiffusionXLPipeline) folder to `out_dir`; -> its path."""
    # The VAE and text encoder in fp32 (not the run's bf16 frozen_dtype),
    # then cast once to the export's dtype.
    cfg, unet, frozen = load_trained(checkpoint, weights, torch.device("cpu"), frozen_dtype="fp32")
    torch_dtype = EXPORT_DTYPES[dtype]
    parts = {"vae": frozen.vae, "text_encoder": frozen.text_encoder, "tokenizer": frozen.tokenizer,
             "unet": unet, "scheduler": scheduler_for(cfg)}
    if frozen.text_encoder_2 is not None:
        # force_zeros_for_empty_prompt: with no negative prompt the pipeline's unconditional input is zeros,
        # the dropped caption of SDXL's training (conditioning.SDXLConditioning)
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=frozen.text_encoder_2,
                                         tokenizer_2=frozen.tokenizer_2, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(dtype=torch_dtype)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        if (Path(out_dir) / name).is_dir():
            load_text_encoder_in_fp32(Path(out_dir) / name / "config.json")
    return Path(out_dir)


def load_text_encoder_in_fp32(config_json: Path) -> None:
    """Loaded without a dtype, diffusers puts the UNet and VAE in fp32 while transformers (5.x) keeps a text
    encoder in its config's `dtype`: a half export then fails at its first step (Half against Float). The
    config says float32: every part loads in fp32 without a dtype, in the given one with it (the weights
    stay half on disk)."""
    config = json.loads(config_json.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
