"""NoiseSchedule and sample_noise, checked against diffusers' DDPMScheduler."""

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_ddp.schedule import NoiseSchedule, sample_noise

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SCHEDULES = [(name, zero_snr) for name in DIFFUSERS_NAME for zero_snr in (False, True)]


def make_pair(beta_schedule: str, zero_snr: bool) -> tuple[NoiseSchedule, DDPMScheduler]:
    ours = NoiseSchedule(T, beta_schedule, 0.00085, 0.012, zero_terminal_snr=zero_snr)
    theirs = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_NAME[beta_schedule],
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=zero_snr,
    )
    return ours, theirs


def random_batch(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(16, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(16, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(0, T, (16,), generator=g)
    t[:2] = torch.tensor([0, T - 1])  # always cover both ends, where zero SNR matters
    return x0, noise, t


@pytest.mark.parametrize("beta_schedule,zero_snr", SCHEDULES)
def test_tables_equal_diffusers(beta_schedule, zero_snr):
    ours, theirs = make_pair(beta_schedule, zero_snr)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.betas, theirs.betas.double())
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod.double())
    assert (ours.alphas_cumprod[-1] == 0) == zero_snr


@pytest.mark.parametrize("beta_schedule,zero_snr", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, zero_snr):
    ours, theirs = make_pair(beta_schedule, zero_snr)
    x0, noise, t = random_batch(0)
    assert (ours.add_noise(x0, noise, t) - theirs.add_noise(x0, noise, t)).abs().max() < 1e-6
    assert (ours.v_target(x0, noise, t) - theirs.get_velocity(x0, noise, t)).abs().max() < 1e-6


@pytest.mark.parametrize("beta_schedule,zero_snr", SCHEDULES)
def test_v_parameterisation_roundtrip(beta_schedule, zero_snr):
    ours, _ = make_pair(beta_schedule, zero_snr)
    x0, noise, t = random_batch(1)
    x_t, v = ours.add_noise(x0, noise, t), ours.v_target(x0, noise, t)
    torch.testing.assert_close(ours.x0_from_v(x_t, v, t), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.eps_from_v(x_t, v, t), noise, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_follows_input_dtype(dtype):
    ours = NoiseSchedule()
    x0, noise, t = random_batch(2, dtype)
    reference = ours.add_noise(x0.double(), noise.double(), t)
    x_t = ours.add_noise(x0, noise, t)
    assert x_t.dtype == dtype and ours.v_target(x0, noise, t).dtype == dtype
    assert (x_t.double() - reference).abs().max() < (1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(zero_snr, gamma):
    ours = NoiseSchedule(zero_terminal_snr=zero_snr)
    t = torch.arange(T)
    a = ours.alphas_cumprod
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    weights = ours.loss_weights(t, gamma)
    assert weights.dtype == torch.float32 and weights.shape == (T,)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.snr(t).double(), snr, rtol=1e-6, atol=0)
    if zero_snr:
        assert weights[-1] == 0 and ours.snr(t)[-1] == 0


def test_loss_weights_none_is_ones():
    t = torch.tensor([0, 500, T - 1])
    assert torch.equal(NoiseSchedule().loss_weights(t, None), torch.ones(3))


def test_sample_noise_offset():
    shape = (3, 4, 8, 8)
    plain = sample_noise(shape, torch.Generator().manual_seed(0), "cpu")
    assert plain.shape == shape and plain.dtype == torch.float32
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = sample_noise(shape, torch.Generator().manual_seed(0), "cpu", offset_noise=0.1)
    again = sample_noise(shape, torch.Generator().manual_seed(0), "cpu", offset_noise=0.1)
    assert offset.shape == shape and torch.equal(offset, again)
    shift = offset - plain  # the offset is one constant per (sample, channel)
    assert not torch.equal(offset, plain)
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_end"),
        ({"zero_terminal_snr": 1}, "zero_terminal_snr"),
    ],
)
def test_bad_args_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: ") as info:
        NoiseSchedule(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_min_snr_gamma_raises():
    with pytest.raises(ValueError, match="^min_snr_gamma: "):
        NoiseSchedule().loss_weights(torch.zeros(2, dtype=torch.long), 0.0)
