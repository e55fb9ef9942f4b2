"""DDPM noise schedule and v-prediction math (Ho et al. 2020; Salimans & Ho 2022).

Symbols follow diffusers' `DDPMScheduler` so the two can be diffed line by line:
`alphas_cumprod[t]` is alpha-bar_t,
`x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise`.
"""

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """[T] float32: betas from the squared-cosine alpha-bar
    (Nichol & Dhariwal 2021, eq. 17), capped at max_beta."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """[T] -> [T]: Lin et al. 2024, Algorithm 1:
    shift and scale sqrt(alphas_cumprod) so the last is exactly 0."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # keeps the first value,
    # zeroes the last
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _check(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


class NoiseSchedule:
    """Discrete-time DDPM forward process over t in [0, num_train_timesteps) with v-prediction helpers."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ):
        T = num_train_timesteps
        _check(isinstance(T, int) and not isinstance(T, bool) and T >= 2, "num_train_timesteps",
               "an int >= 2", T)
        _check(beta_schedule in BETA_SCHEDULES, "beta_schedule", f"one of {BETA_SCHEDULES}", beta_schedule)
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            _check(is_number and 0 < value < 1, name, "a float in (0, 1)", value)
        _check(beta_start < beta_end, "beta_end", f"a value > beta_start={beta_start!r}", beta_end)
        _check(isinstance(zero_terminal_snr, bool), "zero_terminal_snr", "a bool", zero_terminal_snr)

        # Built in float32 exactly as diffusers builds its tables, so a model trained here samples with the
        # same alphas_cumprod in a diffusers pipeline (bitwise); stored as float64 so the derived coefficients
        # below (sqrt, 1 - a, SNR) add no further rounding before the cast to the caller's dtype.
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        else:  # diffusers' "squaredcos_cap_v2"
            betas = _cosine_betas(T)
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)

        self.num_train_timesteps = T
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = betas.double()
        self.alphas_cumprod = alphas_cumprod.double()
        self._tables = {
            "sqrt_alphas_cumprod": self.alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - self.alphas_cumprod).sqrt(),
            # SNR(t) = alpha-bar / (1 - alpha-bar) (Kingma et al. 2021); exactly 0 at a zero-SNR last t.
            "snr": self.alphas_cumprod / (1 - self.alphas_cumprod),
        }
        # (device, dtype) -> tables: the first call per device pays one host->device copy, later calls none.
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _gather(self, name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """t [B] long -> [B] coefficient on device in dtype, from the per-(device, dtype) cached table."""
        tables = self._cache.get((device, dtype))
        if tables is None:
            tables = {k: v.to(device=device, dtype=dtype) for k, v in self._tables.items()}
            self._cache[(device, dtype)] = tables
        return tables[name][t.to(device)]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> (sqrt(a), sqrt(1 - a)), each [B, 1, ..., 1] broadcastable against like [B, ...]."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        sqrt_a = self._gather("sqrt_alphas_cumprod", t, like.device, like.dtype).view(shape)
        sqrt_1ma = self._gather("sqrt_one_minus_alphas_cumprod", t, like.device, like.dtype).view(shape)
        return sqrt_a, sqrt_1ma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise [B, ...], t [B] long -> x_t [B, ...]: q(x_t | x0) (Ho et al. 2020, eq. 4)."""
        sqrt_a, sqrt_1ma = self._coefs(t, x0)
        return sqrt_a * x0 + sqrt_1ma * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise [B, ...], t [B] -> v [B, ...] = sqrt(a) * eps - sqrt(1 - a) * x0
        (Salimans & Ho 2022, sec. 4)."""
        sqrt_a, sqrt_1ma = self._coefs(t, x0)
        return sqrt_a * noise - sqrt_1ma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, v [B, ...], t [B] -> x0 [B, ...] = sqrt(a) * x_t - sqrt(1 - a) * v
        (Salimans & Ho 2022, sec. 4)."""
        sqrt_a, sqrt_1ma = self._coefs(t, x_t)
        return sqrt_a * x_t - sqrt_1ma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, v [B, ...], t [B] -> eps [B, ...] = sqrt(1 - a) * x_t + sqrt(a) * v
        (the rotation's other leg)."""
        sqrt_a, sqrt_1ma = self._coefs(t, x_t)
        return sqrt_1ma * x_t + sqrt_a * v

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] long -> SNR(t) [B] float32 on t.device."""
        return self._gather("snr", t, t.device, torch.float32)

    def loss_weights(self, t: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        """t [B] -> per-sample loss weight [B] float32: min-SNR-gamma for v-prediction, or ones when None."""
        if min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        _check(min_snr_gamma > 0, "min_snr_gamma", "a float > 0 or None", min_snr_gamma)
        # Hang et al. 2023: the eps-loss weight min(SNR, gamma)/SNR becomes min(SNR, gamma)/(SNR + 1)
        # on the v-loss, since ||v - v_hat||^2 = (SNR + 1) ||eps - eps_hat||^2. Zero (not NaN) at zero SNR.
        snr = self.snr(t)
        return snr.clamp(max=min_snr_gamma) / (snr + 1)


def sample_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
    offset_noise: float = 0.0
) -> torch.Tensor:
    """-> [B, C, ...] float32 N(0, I) noise, plus offset_noise * a per-(sample, channel) constant when > 0."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise > 0:
        # Guttenberg 2023 ("Diffusion with offset noise"): a shared per-channel shift lets the model learn to
        # change the mean brightness of an image, which i.i.d. noise barely perturbs at any t.
        offset_shape = tuple(shape[:2]) + (1,) * (len(shape) - 2)
        noise = noise + offset_noise * torch.randn(offset_shape, generator=generator, device=device)
    return noise
