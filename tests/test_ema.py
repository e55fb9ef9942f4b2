"""EMA of the UNet weights: arithmetic against a hand-computed reference, schedule, copy, state round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_ddp.config import EMAConfig
from ldm_ddp.ema import EMA


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)  # has buffers, which the EMA does not average
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def set_weights(net: Net, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def expected_decays(cfg: EMAConfig, n: int) -> list[float]:
    return [min(cfg.decay, (1 + i) / (10 + i)) if cfg.warmup else cfg.decay for i in range(n)]


@pytest.mark.parametrize("warmup", [True, False])
def test_updates_match_a_hand_computed_reference(warmup):
    cfg = EMAConfig(decay=0.5 if warmup else 0.9, warmup=warmup)
    net = Net()
    ema = EMA(net, cfg)
    assert ema.names == ["linear.weight", "linear.bias", "norm.weight", "norm.bias"]  # trainable params only
    reference = {n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad}
    weights = [1.0, -2.0, 3.5, 0.25, 10.0]
    decays = expected_decays(cfg, len(weights))
    if warmup:  # (1+n)/(10+n) = 0.1, 0.1818, 0.25, 0.3077, then capped at 0.5 from n = 8 on only
        assert decays[0] == pytest.approx(0.1) and decays[3] == pytest.approx(4 / 13)
    for n, (value, d) in enumerate(zip(weights, decays)):
        assert ema.decay() == pytest.approx(d)
        set_weights(net, value)
        ema.update(net)
        for name in reference:
            reference[name] = d * reference[name] + (1 - d) * value
        assert ema.num_updates == n + 1
    for name, shadow in zip(ema.names, ema.shadow):
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), reference[name], rtol=1e-6, atol=1e-6)


def test_warmup_reaches_the_target_decay():
    ema = EMA(Net(), EMAConfig(decay=0.9, warmup=True))
    ema.num_updates = 79  # (1 + 79) / (10 + 79) = 0.8989 < 0.9
    assert ema.decay() == pytest.approx(80 / 89)
    ema.num_updates = 81  # 82 / 91 = 0.901 > 0.9
    assert ema.decay() == 0.9
    assert EMA(Net(), EMAConfig(decay=0.9, warmup=False)).decay() == 0.9


def test_update_every_and_start_step_pick_the_steps():
    ema = EMA(Net(), EMAConfig(update_every=3, start_step=5))
    assert [s for s in range(1, 16) if ema.wants_update(s)] == [6, 9, 12, 15]
    ema = EMA(Net(), EMAConfig())
    assert [s for s in range(1, 5) if ema.wants_update(s)] == [1, 2, 3, 4]
    ema = EMA(Net(), EMAConfig(start_step=3, update_every=1))
    assert [s for s in range(1, 6) if ema.wants_update(s)] == [3, 4, 5]


def test_before_start_step_the_ema_copies_the_weights():
    """The training loop's rule: update on wanted steps, else copy the weights while step < start_step."""
    cfg = EMAConfig(decay=0.5, warmup=False, start_step=3, update_every=1)
    net = Net()
    ema = EMA(net, cfg)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        set_weights(net, value)
        if ema.wants_update(step):
            ema.update(net)
        elif step < cfg.start_step:
            ema.copy_from(net)
        if step == 2:  # still copying: the shadow is exactly the weights, no update counted
            assert all(torch.all(s == 2.0) for s in ema.shadow) and ema.num_updates == 0
    # step 3: 0.5 * 2 + 0.5 * 4 = 3; step 4: 0.5 * 3 + 0.5 * 8 = 5.5
    assert all(torch.all(s == 5.5) for s in ema.shadow)
    assert ema.num_updates == 2


def test_copy_to_writes_the_shadow_and_leaves_buffers():
    net = Net(seed=0)
    ema = EMA(net, EMAConfig(decay=0.5, warmup=False))
    set_weights(net, 4.0)
    ema.update(net)  # shadow = (initial + 4) / 2
    target = Net(seed=1)
    with torch.no_grad():
        target.norm.running_mean.fill_(7.0)
    ema.copy_to(target)
    params = dict(target.named_parameters())
    for name, shadow in zip(ema.names, ema.shadow):
        assert torch.equal(params[name], shadow)
    initial = Net(seed=0).linear.weight
    torch.testing.assert_close(target.linear.weight, (initial + 4.0) / 2)
    assert torch.all(target.norm.running_mean == 7.0)
    assert torch.all(target.frozen == 1.0)


def test_state_round_trip_through_safetensors(tmp_path):
    cfg = EMAConfig(decay=0.99, warmup=True, update_every=2, start_step=4)
    net = Net()
    ema = EMA(net, cfg)
    for value in (1.0, 2.0, 3.0):
        set_weights(net, value)
        ema.update(net)
    tensors = ema.state_tensors()
    assert sorted(tensors) == sorted(f"ema.{n}" for n in ema.names)
    meta = json.loads(json.dumps(ema.state_meta()))  # as stored in checkpoint metadata
    assert meta == {"num_updates": 3, "decay": 0.99, "warmup": True, "update_every": 2, "start_step": 4}
    save_file(tensors, tmp_path / "ema.safetensors")

    restored = EMA(Net(seed=5), cfg)
    restored.load(load_file(tmp_path / "ema.safetensors"), meta)
    assert restored.num_updates == 3 and restored.decay() == ema.decay()
    for a, b in zip(ema.shadow, restored.shadow):
        assert torch.equal(a, b)
    # Both continue identically.
    set_weights(net, 9.0)
    ema.update(net)
    restored.update(net)
    for a, b in zip(ema.shadow, restored.shadow):
        assert torch.equal(a, b)


def test_load_refuses_missing_tensors():
    ema = EMA(Net(), EMAConfig())
    tensors = ema.state_tensors()
    del tensors["ema.linear.bias"]
    with pytest.raises(KeyError, match="linear.bias"):
        EMA(Net(), EMAConfig()).load(tensors, ema.state_meta())


def test_bf16_module_gets_an_fp32_shadow():
    net = Net().to(torch.bfloat16)
    ema = EMA(net, EMAConfig(decay=0.999, warmup=False))
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    set_weights(net, 1.0)
    ema.copy_from(net)
    set_weights(net, 1.0078125)  # 1 + 2**-7, the next bf16 value after 1
    for _ in range(3):
        ema.update(net)
    # 1 + (1 - 0.999**3) * 2**-7 = 1.0000234: below bf16 resolution, kept by the fp32 shadow
    expected = 1 + (1 - 0.999 ** 3) * 2 ** -7
    for shadow in ema.shadow:
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow, torch.full_like(shadow, expected), rtol=0, atol=1e-7)
        assert torch.all(shadow.bfloat16().float() == 1.0)  # a bf16 shadow would have lost the update
    ema.copy_to(net)
    assert net.linear.weight.dtype == torch.bfloat16
