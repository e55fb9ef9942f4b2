"""model.lora_rank: LoRA adapters on the UNet's attention projections, the rest frozen; checkpoints resume
bitwise and load in the tools as a plain UNet with the adapters merged."""

import pytest
import torch
from conftest import train_here
from test_train import assert_bitwise_equal

from ldm_ddp.checkpoint import load_checkpoint

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def start(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("lora_start") / "run"
    train_here(*tiny_args(out, train__max_steps=2))
    return out / "checkpoints" / "step_0000002.safetensors"


@pytest.mark.slow
def test_lora_trains_only_its_adapters_resumes_bitwise_and_loads_merged(tmp_path, tiny_args, start):
    from ldm_ddp.config import ModelConfig
    from ldm_ddp.models import add_lora, build_unet, load_trained

    common = {"model__unet_init": str(start), "model__lora_rank": 4, "ckpt__every": 2, "optim__lr": 1e-2}
    train_here(*tiny_args(tmp_path / "straight", train__max_steps=4, **common))
    train_here(*tiny_args(tmp_path / "resumed", train__max_steps=2, **common))
    train_here(*tiny_args(tmp_path / "resumed", train__max_steps=4, **common))
    final = "checkpoints/step_0000004.safetensors"
    assert_bitwise_equal(tmp_path / "straight" / final, tmp_path / "resumed" / final)

    tensors, meta = load_checkpoint(tmp_path / "straight" / final)
    started, _ = load_checkpoint(start)
    assert meta["architecture"]["lora"] == {"rank": 4}
    lora = [k for k in tensors if k.startswith("unet.") and ".lora_" in k]
    assert lora and all(".lora_" in k for k in tensors if k.startswith(("ema.", "optim.")))  # only adapters
    for key, value in tensors.items():  # the frozen weights are the start's EMA weights, untouched
        if key.startswith("unet.") and ".lora_" not in key:
            plain = key.replace(".base_layer.", ".").replace("unet.", "ema.", 1)
            assert torch.equal(value, started[plain]), key
    assert any(tensors[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B starts at zero: it trained

    # The tools read a plain UNet: the adapters merged into the weights, the same function as the adapted one
    _, merged, frozen = load_trained(str(tmp_path / "straight" / final), "raw", torch.device("cpu"))
    adapted = build_unet(ModelConfig(unet=str(tiny_args(tmp_path)[0].split("=", 1)[1])), 8,
                         frozen.text_encoder.config.hidden_size)
    add_lora(adapted, 4)
    adapted.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    assert not any(".lora_" in k for k in merged.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context = torch.randn(2, 16, frozen.text_encoder.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, context).sample, adapted.eval()(x, t, context).sample,
                                   atol=1e-5, rtol=1e-4)

    from ldm_ddp.config import ConfigError
    with pytest.raises(ConfigError, match="lora"):  # another rank (or none) would mean other weights
        train_here(*tiny_args(tmp_path / "resumed", train__max_steps=6, **{**common, "model__lora_rank": 8}))
