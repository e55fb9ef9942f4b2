"""EMA of the UNet weights: arithmetic against a hand-computed reference, schedule, copy, state round trip;
several profiles at once (fixed decays and power-function EMAs, Karras et al. 2024), picked by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_ddp.config import ConfigError, EMAConfig
from ldm_ddp.ema import (
    EMA,
    checkpoint_profiles,
    power_exponent,
    profiles_of,
    weights_prefix,
)


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
        for name, ref in reference.items():
            reference[name] = d * ref + (1 - d) * value
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


def test_update_every_picks_the_steps():
    ema = EMA(Net(), EMAConfig(update_every=3))
    assert [s for s in range(1, 13) if ema.wants_update(s)] == [3, 6, 9, 12]
    ema = EMA(Net(), EMAConfig())
    assert [s for s in range(1, 5) if ema.wants_update(s)] == [1, 2, 3, 4]


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
    cfg = EMAConfig(decay=0.99, warmup=True, update_every=2)
    net = Net()
    ema = EMA(net, cfg)
    for value in (1.0, 2.0, 3.0):
        set_weights(net, value)
        ema.update(net)
    tensors = ema.state_tensors()
    assert sorted(tensors) == sorted(f"ema.{n}" for n in ema.names)
    meta = json.loads(json.dumps(ema.state_meta()))  # as stored in checkpoint metadata
    assert meta == {"num_updates": 3, "decay": 0.99, "warmup": True, "update_every": 2, "start_step": 0,
                    "profiles": [{"name": "ema", "tensors": "ema", "decay": 0.99}]}
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


def test_power_exponent_matches_karras_et_al():
    # edm2's std_to_exp: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (Karras et al. 2024, sec. 3.1).
    assert power_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    for std in (0.02, 0.1, 0.2, 0.28):
        g = power_exponent(std)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(std ** 2, rel=1e-9)


def test_several_profiles_update_independently():
    cfg = EMAConfig(decay=0.5, warmup=False, extra_decays=[0.9, 0.5], power_stds=[0.1])
    net = Net()
    ema = EMA(net, cfg)
    assert [p.name for p in ema.profiles] == ["ema", "ema:0.9", "ema:std=0.1"]  # the repeated 0.5 is dropped
    assert [p.prefix for p in ema.profiles] == ["ema", "ema_0p9", "ema_std0p1"]
    initial = {n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad}
    weights = [1.0, -2.0, 3.5, 0.25, 10.0, 4.0]
    fixed = {0.5: dict(initial), 0.9: dict(initial)}
    for value in weights:
        set_weights(net, value)
        ema.update(net)
        for d, ref in fixed.items():
            for name in ref:
                ref[name] = d * ref[name] + (1 - d) * value
    for shadow, d in zip(ema.shadows[:2], (0.5, 0.9)):
        for name, s in zip(ema.names, shadow):
            torch.testing.assert_close(s.double(), fixed[d][name], rtol=1e-6, atol=1e-6)
    # The power-function EMA after N updates is sum_i w_i (i^(g+1) - (i-1)^(g+1)) / N^(g+1) (Karras et al.
    # 2024, eq. 2 in discrete form): independent of the initial weights, since its first update has decay 0.
    g, n = power_exponent(0.1), len(weights)
    expected = (sum(w * (i ** (g + 1) - (i - 1) ** (g + 1)) for i, w in enumerate(weights, start=1))
                / n ** (g + 1))
    for s in ema.shadows[2]:
        torch.testing.assert_close(s.double(), torch.full_like(s.double(), expected), rtol=1e-5, atol=1e-5)
    target = Net(seed=3)
    ema.copy_to(target, "ema:std=0.1")
    assert torch.equal(target.linear.weight, ema.shadows[2][0])
    ema.copy_to(target, "ema:0.5")  # the default profile by its decay
    assert torch.equal(target.linear.weight, ema.shadows[0][0])


def test_profiles_round_trip_and_match_by_value(tmp_path):
    cfg = EMAConfig(decay=0.99, extra_decays=[0.999], power_stds=[0.05, 0.1])
    net = Net()
    ema = EMA(net, cfg)
    for value in (1.0, 2.0, 3.0):
        set_weights(net, value)
        ema.update(net)
    tensors, meta = ema.state_tensors(), json.loads(json.dumps(ema.state_meta()))
    assert len(tensors) == 4 * len(ema.names) and "ema_std0p05.linear.weight" in tensors
    assert [p["name"] for p in meta["profiles"]] == ["ema", "ema:0.999", "ema:std=0.05", "ema:std=0.1"]
    assert meta["profiles"][3]["gamma"] == pytest.approx(6.9372, abs=1e-4)
    save_file(tensors, tmp_path / "ema.safetensors")
    loaded = load_file(tmp_path / "ema.safetensors")

    # Another order and a subset: every profile finds its own tensors by value.
    restored = EMA(Net(seed=5), EMAConfig(decay=0.99, power_stds=[0.1, 0.05]))
    restored.load(loaded, meta)
    by_name = dict(zip([p.name for p in ema.profiles], ema.shadows))
    for profile, shadow in zip(restored.profiles, restored.shadows):
        assert all(torch.equal(a, b) for a, b in zip(shadow, by_name[profile.name]))
    assert restored.num_updates == 3
    with pytest.raises(ConfigError, match="no EMA profile ema:0.9999"):
        EMA(Net(), EMAConfig(decay=0.99, extra_decays=[0.9999])).load(loaded, meta)


def test_a_checkpoint_from_before_profiles_loads():
    """`ema` metadata without `profiles` (one decay, tensors ema.*) still loads and is picked by --weights."""
    old = EMA(Net(), EMAConfig(decay=0.9))
    meta = {k: v for k, v in old.state_meta().items() if k != "profiles"}
    assert checkpoint_profiles(meta) == [{"name": "ema", "tensors": "ema", "decay": 0.9}]
    EMA(Net(seed=2), EMAConfig(decay=0.9)).load(old.state_tensors(), meta)
    assert weights_prefix(meta, "ema") == weights_prefix(meta, "ema:0.9") == "ema"
    assert weights_prefix(meta, "raw") == "unet"


def test_weights_names_resolve_or_fail_naming_the_profiles():
    meta = EMA(Net(), EMAConfig(decay=0.995, extra_decays=[0.9999], power_stds=[0.1])).state_meta()
    assert weights_prefix(meta, "ema:0.9999") == "ema_0p9999"
    assert weights_prefix(meta, "ema:std=0.1") == weights_prefix(meta, "ema:std=0.10") == "ema_std0p1"
    assert weights_prefix(meta, "ema:0.995") == "ema"
    with pytest.raises(ConfigError, match=r"no EMA profile 'ema:0.5' .*it has: raw, ema \(decay 0.995\), "
                                          r"ema:0.9999, ema:std=0.1"):
        weights_prefix(meta, "ema:0.5")
    for bad in ("ema:fast", "best", "ema:std=x"):
        with pytest.raises(ConfigError,
                           match=r"^--weights: expected ema \| raw \| ema:DECAY \| ema:std=SIGMA_REL"):
            weights_prefix(meta, bad)


@pytest.mark.parametrize("changes, key", [({"extra_decays": [1.0]}, "ema.extra_decays"),
                                          ({"extra_decays": ["0.9"]}, "ema.extra_decays"),
                                          ({"power_stds": [0.3]}, "ema.power_stds"),
                                          ({"power_stds": [0.0]}, "ema.power_stds")])
def test_bad_profiles_fail_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        profiles_of(EMAConfig(**changes))


def test_update_with_ok_false_keeps_every_shadow():
    """A skipped step (ok False on the device) leaves all profiles as they were; the schedule still
    advances."""
    net = Net()
    ema = EMA(net, EMAConfig(decay=0.5, warmup=False, extra_decays=[0.9], power_stds=[0.1]))
    set_weights(net, 1.0)
    ema.update(net, torch.tensor(True))
    before = [[t.clone() for t in shadow] for shadow in ema.shadows]
    set_weights(net, 5.0)
    ema.update(net, torch.tensor(False))
    assert ema.num_updates == 2
    assert all(torch.equal(a, b) for old, new in zip(before, ema.shadows) for a, b in zip(old, new))
    reference = EMA(Net(), EMAConfig(decay=0.5, warmup=False, extra_decays=[0.9], power_stds=[0.1]))
    reference.num_updates = 2
    reference.shadows = [[t.clone() for t in shadow] for shadow in before]
    ema.update(net, torch.tensor(True))
    reference.update(net)
    assert all(torch.equal(a, b) for x, y in zip(ema.shadows, reference.shadows) for a, b in zip(x, y))


@pytest.mark.slow
def test_compiled_update_gives_the_eager_updates_skips_included(monkeypatch):
    """EMA.compile (scripts/bench.py --ema-compile): the same shadows as the eager update, step by step, a
    skipped step (ok False) and every profile included; one compiled graph serves all profiles and steps (the
    weight is a tensor). The backend is aot_eager here (the same graph, no C++ compiler);
    on CUDA inductor fuses it."""
    import ldm_ddp.ema as ema_module
    monkeypatch.setattr(ema_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = {"decay": 0.9, "extra_decays": [0.5], "power_stds": [0.1]}
    net = Net()
    eager, compiled = EMA(net, EMAConfig(**cfg)), EMA(net, EMAConfig(**cfg))
    compiled.compile()
    assert eager.fused is None and compiled.fused is not None
    set_weights(net, 7.0)  # weights away from the shadows, as after a resume
    compiled.probe(net)  # weight 0: builds the graph, changes nothing
    assert all(torch.equal(a, b) for x, y in zip(eager.shadows, compiled.shadows) for a, b in zip(x, y))
    for i, ok in enumerate([True, True, False, True]):
        set_weights(net, float(i + 2))
        for ema in (eager, compiled):
            ema.update(net, torch.tensor(ok))
        assert all(torch.equal(a, b)
                   for x, y in zip(eager.shadows, compiled.shadows) for a, b in zip(x, y)), i
    assert not torch.equal(eager.shadows[0][0], Net().linear.weight.float())  # they moved
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_deferred_updates_give_the_same_bits_and_wait_for_their_launch():
    """ema.overlap (defer_updates): an update waits for launch_pending (the next step's start) or settle (the
    next optimizer step, any read of the shadows); either way every shadow ends bit-identical to updating at
    once, skipped steps and several profiles included."""
    cfg = EMAConfig(decay=0.9, extra_decays=[0.5], power_stds=[0.1])
    at_once, deferred = Net(), Net()
    ema_now, ema_later = EMA(at_once, cfg), EMA(deferred, cfg)
    ema_later.defer_updates(torch.device("cpu"))
    for step, (value, ok) in enumerate(zip([1.0, -2.0, 3.5, 0.25, 10.0], [True, True, False, True, True])):
        for net in (at_once, deferred):
            set_weights(net, value)
        flag = torch.tensor(ok)
        ema_now.update(at_once, flag)
        before = [s.clone() for s in ema_later.shadows[0]]
        ema_later.update(deferred, flag)
        assert ema_later.pending is not None and ema_later.num_updates == step + 1
        assert all(torch.equal(a, b) for a, b in zip(before, ema_later.shadows[0]))  # nothing moved yet
        # the next step, or the optimizer step first
        (ema_later.launch_pending if step % 2 else ema_later.settle)()
        assert ema_later.pending is None
    ema_later.update(deferred)  # pending at save time: state_tensors applies it first
    ema_now.update(at_once)
    later, now = ema_later.state_tensors(), ema_now.state_tensors()
    assert sorted(later) == sorted(now) and all(torch.equal(later[k], now[k]) for k in now)
    assert ema_later.state_meta() == ema_now.state_meta()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream of ema.overlap needs a GPU")
def test_deferred_updates_on_a_cuda_side_stream_give_the_same_bits():
    """ema.overlap on a GPU: every update launched on the side stream as a step starts, settled before the
    optimizer step, ends bit-identical to updating after the optimizer. Steps alternate between a forward and
    backward beside the update (the training loop's case) and next to no work on the current stream (gradients
    filled in), where the optimizer would overwrite the weights under the update's reads without the stream
    waits: four profiles make the update outlast it. The weights stay finite (NaN would fail any
    comparison)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(12)]).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    cfg = EMAConfig(decay=0.99, extra_decays=[0.9, 0.95, 0.999])
    now, later = EMA(net, cfg), EMA(net, cfg)
    later.defer_updates(device)
    x = torch.randn(8192, 4096, device=device)
    for step in range(10):
        later.launch_pending()  # as the training loop does, before the step's work
        if step % 2:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                net(x).float().square().mean().backward()
        else:
            for p in net.parameters():
                p.grad = torch.full_like(p, 1e-3 * (step + 1))
        later.settle()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ok = torch.tensor(step != 3, device=device)
        now.update(net, ok)
        later.update(net, ok)
    at_once, deferred = now.state_tensors(), later.state_tensors()
    assert all(torch.isfinite(t).all() for t in at_once.values())
    assert not torch.equal(at_once["ema.0.weight"], net[0].weight)  # the weights moved, the EMA behind them
    assert sorted(at_once) == sorted(deferred) and all(torch.equal(at_once[k], deferred[k]) for k in at_once)


class Mixed(torch.nn.Module):
    """Weights in both layouts the trainer has: a channels-last 3x3 and 1x1 convolution, a linear layer."""

    def __init__(self, device: str = "cpu", width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(width, width, 3)
        self.skip = torch.nn.Conv2d(width, 2 * width, 1)
        self.linear = torch.nn.Linear(width, 3 * width)
        self.to(device, memory_format=torch.channels_last)


def one_pass_against_foreach(device: str, width: int, steps: int) -> tuple[EMA, EMA, torch.nn.Module]:
    """Two EMAs of three profiles over the same updates (random weights, a skipped step): one through the
    one-pass kernel, one through the three foreach passes."""
    from ldm_ddp.ema_kernel import OnePassUpdate
    net = Mixed(device, width)
    cfg = EMAConfig(decay=0.999, extra_decays=[0.9], power_stds=[0.1])
    kernel, foreach = EMA(net, cfg), EMA(net, cfg)
    kernel.one_pass, foreach.one_pass = OnePassUpdate(kernel.shadows), None
    before = [t.clone() for t in kernel.shadows[0]]
    kernel.one_pass.probe()  # a weight of 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, kernel.shadows[0]))
    for step in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * (step + 1))  # far from the shadows: every rounding counts
        ok = torch.tensor(step != 1, device=device)
        assert kernel.one_pass.fits(kernel._weights(net))
        kernel.update(net, ok)
        foreach.update(net, ok)
    return kernel, foreach, net


def assert_same_shadows(a: EMA, b: EMA) -> None:
    assert all(torch.equal(x, y) for p, q in zip(a.shadows, b.shadows) for x, y in zip(p, q))


def test_the_one_pass_update_gives_the_foreach_bits_in_tritons_interpreter(monkeypatch):
    """ema_kernel (the GPU's update, one Triton kernel for every weight and profile), run by Triton's CPU
    interpreter: bit-identical shadows to the three foreach passes across layouts, tensors of several blocks,
    profiles and a skipped step; weights that do not fit (another layout than the shadows', an address that is
    not a multiple of 16 bytes) are refused, and
    the address table follows weights that moved. (The interpreter has no fused multiply-add: that it stays
    off is the GPU test's to show.)"""
    triton = pytest.importorskip("triton")  # CPU builds of torch come without it; the test extra installs it
    from triton.runtime.interpreter import InterpretedFunction

    from ldm_ddp import ema_kernel
    monkeypatch.setattr(ema_kernel.OnePassUpdate, "kernel", InterpretedFunction(ema_kernel.lerp_kernel.fn))
    monkeypatch.setattr(ema_kernel, "BLOCK", 64)  # tensors of up to 9 blocks (the GPU's 8192 would be one)
    kernel, foreach, net = one_pass_against_foreach("cpu", 8, 4)
    assert len(kernel.one_pass.block_tensor) > len(kernel.names)
    assert 0 < kernel.one_pass.unmasked < len(kernel.one_pass.block_tensor)  # both launches: inside, last
    assert_same_shadows(kernel, foreach)
    assert not torch.equal(kernel.shadows[0][0], kernel.shadows[2][0])  # the profiles differ
    assert triton is not None and kernel.one_pass.key is not None

    held = [net.conv.weight.data]  # kept alive: the allocator could hand a freed address to the next weights
    net.conv.weight.data = net.conv.weight.data.contiguous()  # moved, and no longer the shadows' layout
    held.append(net.conv.weight.data)
    assert not kernel.one_pass.fits(kernel._weights(net))
    kernel.update(net)  # the foreach passes, then
    foreach.update(net)
    assert_same_shadows(kernel, foreach)
    before = kernel.one_pass.table.clone()
    net.conv.weight.data = net.conv.weight.data.to(memory_format=torch.channels_last) * 2  # moved again
    assert kernel.one_pass.fits(kernel._weights(net))
    kernel.update(net)
    foreach.update(net)
    assert not torch.equal(before, kernel.one_pass.table)
    assert_same_shadows(kernel, foreach)
    bias = net.linear.bias.data
    net.linear.bias.data = torch.cat([bias.new_zeros(1), bias])[1:]  # 4 bytes past a 16-byte multiple
    assert net.linear.bias.data_ptr() % 16 and not kernel.one_pass.fits(kernel._weights(net))
    kernel.update(net)
    foreach.update(net)
    assert_same_shadows(kernel, foreach)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass EMA update runs on a GPU")
def test_the_one_pass_update_gives_the_foreach_bits_on_a_gpu():
    """On a GPU the EMA updates through ema_kernel by default; its shadows are bit-identical to the foreach
    passes' (no fused multiply-add), for tensors of many blocks."""
    kernel, foreach, _ = one_pass_against_foreach("cuda", 256, 6)
    assert EMA(Mixed("cuda"), EMAConfig()).one_pass is not None  # the default there
    assert_same_shadows(kernel, foreach)


def test_where_the_one_pass_kernel_does_not_run_the_ema_takes_the_foreach_passes(monkeypatch, capsys):
    """A kernel that cannot launch (no C compiler for Triton's launcher, an unsupported card) fails its probe
    as the EMA is made, with a warning naming why: the EMA then updates through the foreach passes."""
    import torch.utils._triton

    from ldm_ddp import ema_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
            return launch

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(ema_kernel.OnePassUpdate, "kernel", Broken())
    net = Mixed()
    assert ema_kernel.one_pass_for(EMA(net, EMAConfig()).shadows) is None
    assert "one-pass EMA update does not run here (RuntimeError: Failed to find C compiler" in \
        capsys.readouterr().out
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert ema_kernel.one_pass_for(EMA(net, EMAConfig()).shadows) is None
    assert capsys.readouterr().out == ""  # not even tried
