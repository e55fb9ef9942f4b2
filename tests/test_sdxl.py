"""SDXL's conditioning kind on the tiny demo_sdxl bundle: two text encoders, the pooled embedding and the
size/crop time ids from the data path; training, resume, sampling and export to StableDiffusionXLPipeline."""

import pytest
import torch
from conftest import train_here
from test_train import metrics

from ldm_ddp.conditioning import SDXLConditioning, make_conditioning
from ldm_ddp.config import ConfigError, ModelConfig
from ldm_ddp.models import build_unet, load_frozen

PROMPTS = ["a large red circle in the center", "a small blue square in the top left"]


def sdxl_args(tiny_args, out, **changes):
    return tiny_args(out, model__kind="sdxl", model__unet="demo_sdxl", model__pretrained="builtin:demo_sdxl",
                     **changes)


@pytest.fixture(scope="module")
def frozen():
    return load_frozen("builtin:demo_sdxl", "fp32", torch.device("cpu"), kind="sdxl")


def test_context_pooled_embedding_and_time_ids_of_a_batch(frozen):
    conditioning = make_conditioning(frozen, caption_dropout=0.0)
    assert isinstance(conditioning, SDXLConditioning)
    assert (conditioning.width, conditioning.pooled_width) == (64 + 32, 32)
    ids = conditioning.tokenize(PROMPTS)
    assert ids.shape == (2, 2, 16)  # [B, tokenizer, L]
    batch = {"input_ids": ids, "images": torch.zeros(2, 3, 64, 128, dtype=torch.uint8),
             "original_size": torch.tensor([[480, 1000], [64, 128]]),
             "crop_top_left": torch.tensor([[0, 12], [3, 0]])}
    cond = conditioning.encode(batch)
    context, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    assert context.shape == (2, 16, 96) and added["text_embeds"].shape == (2, 32)
    # each encoder's penultimate hidden state, side by side; the second's projected end-of-text state
    first = frozen.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
    second = frozen.text_encoder_2(ids[:, 1], output_hidden_states=True)
    assert torch.equal(context, torch.cat([first, second.hidden_states[-2]], dim=-1))
    assert torch.equal(added["text_embeds"], second.text_embeds)
    assert added["time_ids"].tolist() == [[480, 1000, 0, 12, 64, 128], [64, 128, 3, 0, 64, 128]]
    # a cached batch: the target size from the moments' latent size
    cached = {**batch, "moments": torch.zeros(2, 8, 8, 16)}
    del cached["images"]
    assert torch.equal(conditioning.encode(cached)["added_cond_kwargs"]["time_ids"], added["time_ids"])
    # the sampler's: an uncropped image of the asked size
    sampled = conditioning.encode_prompts(PROMPTS, size=(128, 64))
    assert torch.equal(sampled["encoder_hidden_states"], context)
    assert sampled["added_cond_kwargs"]["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 2


def test_a_dropped_caption_zeros_context_and_pooled_embedding_together_and_keeps_its_time_ids(frozen):
    batch = {"input_ids": make_conditioning(frozen).tokenize(PROMPTS * 4),
             "images": torch.zeros(8, 3, 64, 64, dtype=torch.uint8),
             "original_size": torch.tensor([[100, 200]] * 8), "crop_top_left": torch.tensor([[1, 2]] * 8)}
    kept = make_conditioning(frozen, caption_dropout=0.0).encode(batch)
    cond = make_conditioning(frozen, caption_dropout=0.5).encode(batch, torch.Generator().manual_seed(1))
    context, pooled = cond["encoder_hidden_states"], cond["added_cond_kwargs"]["text_embeds"]
    dropped = (context == 0).all(dim=(1, 2))
    assert torch.equal(dropped, (pooled == 0).all(dim=1))  # together
    assert 0 < dropped.sum() < 8  # this draw drops some, not all
    assert torch.equal(context[~dropped], kept["encoder_hidden_states"][~dropped])
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], kept["added_cond_kwargs"]["time_ids"])
    uncond = make_conditioning(frozen).unconditional(3, (64, 64))
    assert not uncond["encoder_hidden_states"].any() and uncond["encoder_hidden_states"].shape == (3, 16, 96)
    assert not uncond["added_cond_kwargs"]["text_embeds"].any()


def test_a_unet_of_the_other_kind_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^model.unet: model.kind = \"sdxl\" needs addition_embed_type"):
        build_unet(ModelConfig(unet="demo"), 8, 64, pooled_width=32)
    with pytest.raises(ConfigError, match=r"^model.unet: addition_embed_type 'text_time' needs model.kind"):
        build_unet(ModelConfig(unet="demo_sdxl"), 8, 96)
    with pytest.raises(ConfigError, match=r"input_dim 128 is not the pooled width 64 \+ 6 x"):
        build_unet(ModelConfig(unet="demo_sdxl"), 8, 96, pooled_width=64)
    unet = build_unet(ModelConfig(unet="demo_sdxl"), 8, 96, pooled_width=32)
    assert unet.config.addition_embed_type == "text_time"


@pytest.mark.slow
def test_sdxl_trains_resumes_bitwise_and_exports_a_pipeline_that_samples_as_ours(tmp_path, tiny_args, caplog):
    import logging

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from ldm_ddp.export import export_diffusers
    from ldm_ddp.models import load_trained
    from ldm_ddp.sampling import generate, initial_noise
    from ldm_ddp.schedule import NoiseSchedule

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_here(*sdxl_args(tiny_args, whole, train__max_steps=4, train__caption_dropout=0.5))
    train_here(*sdxl_args(tiny_args, resumed, train__max_steps=2, train__caption_dropout=0.5))
    train_here(*sdxl_args(tiny_args, resumed, train__max_steps=4, train__caption_dropout=0.5))
    ckpt = whole / "checkpoints" / "step_0000004.safetensors"
    a, b = load_file(ckpt), load_file(resumed / "checkpoints" / "step_0000004.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with caplog.at_level(logging.WARNING):
        folder = export_diffusers(str(ckpt), str(tmp_path / "x"), "fp32")
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()
                or "not initialized" in r.getMessage().lower()]
    cfg, unet, frozen = load_trained(str(ckpt), "ema", torch.device("cpu"))
    d = cfg.diffusion
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    for width, height in ((64, 64), (128, 64)):
        ours = generate(unet, frozen, schedule, PROMPTS, [3, 4], 8, 3.0, 0.7, "trailing", autocast=False,
                        size=(width, height))
        noise = initial_noise([3, 4], (4, height // 8, width // 8))
        theirs = pipe(PROMPTS, height=height, width=width, latents=noise, num_inference_steps=8,
                      guidance_scale=3.0, guidance_rescale=0.7, output_type="pt").images * 2 - 1
        assert theirs.shape == ours.shape == (2, 3, height, width)
        assert (theirs - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_a_bucketed_sdxl_latent_cache_keeps_both_tokenizers_ids_and_trains(tmp_path, tiny_args):
    from safetensors import safe_open
    from test_latent_cache import config, mixed_aspect_photos

    from ldm_ddp.precompute import precompute_latents

    photos, out = mixed_aspect_photos(tmp_path / "photos"), tmp_path / "cache"
    sdxl = ["--model.kind=sdxl", "--model.pretrained=builtin:demo_sdxl", "--data.resolution=128",
            "--data.buckets=auto"]
    cache_args = [f"--data.path={out}", *sdxl[2:], "--model.frozen_dtype=fp32", "--data.random_flip=true"]
    manifest = precompute_latents(config(photos, *sdxl), str(out), batch=3, shard_size=64)
    assert {"tokenizer", "tokenizer_2"} <= manifest["fingerprint"].keys()
    with safe_open(out / "latents-000000.safetensors", framework="pt") as f:
        ids = f.get_tensor("input_ids")
    assert ids.shape[0] == manifest["num_samples"] and ids.shape[2:] == (2, 16)  # [n, K, tokenizer, L]
    printed = train_here(*sdxl_args(tiny_args, tmp_path / "run", train__max_steps=2), "--data.source=latents",
                         *cache_args)
    assert "data: 3 aspect-ratio buckets" in printed
    # the same cache under the SD kind: another tokenizer set, refused
    with pytest.raises(ConfigError, match=r"^data.path: the latent cache .* was made with tokenizer_2="):
        train_here(*tiny_args(tmp_path / "sd", train__max_steps=1), "--data.source=latents",
                   *cache_args)


@pytest.mark.slow
def test_dpo_on_sdxl_doubles_the_pooled_embedding_and_size_ids_with_the_pairs(tmp_path, tiny_args):
    """Diffusion-DPO with SDXL's conditioning: each pair's caption, pooled embedding and time ids go to both
    of its images; the tuned run trains and logs the reward figures."""
    start = tmp_path / "start"
    train_here(*sdxl_args(tiny_args, start, train__max_steps=1, ckpt__every=1))
    out = tmp_path / "dpo"
    train_here(*sdxl_args(tiny_args, out, train__max_steps=2, data__source="shapes_pairs",
                          train__objective="dpo", train__caption_dropout=0.0,
                          model__unet_init=str(start / "checkpoints" / "step_0000001.safetensors")))
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["dpo_model_minus_reference"] == 0 and 0 <= records[1]["dpo_reward_accuracy"] <= 1
