"""models.py: UNet from a config or a folder, the frozen parts from a local folder, attention fallback."""

import json

import pytest
import torch

from ldm_ddp.config import ConfigError, ModelConfig
from ldm_ddp.models import build_unet, load_frozen, resolve_pretrained, set_attention


def test_unet_from_config_and_from_folder_agree(tmp_path, tiny_unet_json):
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet=str(tiny_unet_json)), latent_size=8, cross_attention_dim=64)
    assert unet.training and unet.config.sample_size == 8
    assert (json.loads(tiny_unet_json.read_text())["block_out_channels"]
            == list(unet.config.block_out_channels))
    unet.save_pretrained(tmp_path / "unet")
    loaded = build_unet(ModelConfig(unet_init=str(tmp_path / "unet")), latent_size=8, cross_attention_dim=64)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        build_unet(ModelConfig(unet=str(tiny_unet_json)), latent_size=8, cross_attention_dim=32)


def test_frozen_models_load_from_a_local_folder_and_encode():
    frozen = load_frozen(resolve_pretrained("builtin:demo"), "fp32", torch.device("cpu"))
    for module in (frozen.vae, frozen.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert frozen.scaling_factor == frozen.vae.config.scaling_factor != 1.0  # measured by stage 1
    ids = frozen.tokenize(["a large red circle in the center", ""])
    assert ids.shape == (2, frozen.tokenizer.model_max_length) and (ids[0] != ids[1]).any()
    context = frozen.encode_prompts(ids)
    assert context.shape == (2, ids.shape[1], frozen.text_encoder.config.hidden_size)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = frozen.encode_images(images, None)
    assert latents.shape == (2, frozen.latent_channels, 64 // frozen.downsample, 64 // frozen.downsample)
    drawn = frozen.encode_images(images, torch.Generator().manual_seed(0))
    assert not torch.equal(drawn, latents)  # a posterior sample, not its mean
    assert torch.equal(drawn, frozen.encode_images(images, torch.Generator().manual_seed(0)))
    assert frozen.decode_latents(latents).shape == images.shape
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # what the loader carries
    assert torch.equal(frozen.encode_images(pixels, None),
                       frozen.encode_images(pixels.float() / 127.5 - 1, None))


def test_missing_pretrained_folder_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_frozen(str(tmp_path / "nowhere"), "fp32", torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.pretrained"):
        resolve_pretrained("builtin:nope")


def test_xformers_falls_back_to_sdpa_with_one_warning(tiny_unet_json, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    unet = build_unet(ModelConfig(unet=str(tiny_unet_json)), latent_size=8, cross_attention_dim=64)
    assert set_attention(unet, "xformers") == "sdpa"
    warning = [line for line in capsys.readouterr().out.splitlines() if "xformers" in line]
    assert len(warning) == 1 and "SDPA" in warning[0]


def test_the_xformers_probe_runs_on_the_device_the_unet_trains_on(tiny_unet_json, monkeypatch):
    """xformers has CUDA kernels only: probing before the UNet reached the GPU would always fail. A stand-in
    xformers records the probe's device; "meta" stands for a device other than the CPU the UNet is built
    on."""
    import sys
    import types

    probed = []
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v: probed.append(q.device.type)
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    unet = build_unet(ModelConfig(unet=str(tiny_unet_json), attention="xformers"), latent_size=8,
                      cross_attention_dim=64, device="meta")
    assert probed == ["meta"] and unet.device.type == "meta"
