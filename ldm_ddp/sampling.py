"""DDIM sampling (Song et al. 2021) for v-prediction models, with classifier-free guidance; image grids; the
live sample grids of a training run."""

import copy
import math
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import dist
from .conditioning import make_conditioning, map_cond
from .config import ConfigError, SampleConfig, max_sample_steps
from .schedule import NoiseSchedule

SPACINGS = ("leading", "trailing")


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
    """-> [num_steps] long, descending: the training timesteps DDIM visits (Lin et al. 2024, Table 2)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    most = max_sample_steps(num_train_timesteps, spacing)
    if not 1 <= num_steps <= most:
        raise ValueError(f"num_steps: expected an int in [1, {most}] for {spacing} spacing, "
                         f"got {num_steps!r}")
    T, n = num_train_timesteps, num_steps
    i = torch.arange(n, dtype=torch.long)
    if spacing == "leading":
        # Stable Diffusion's original spacing (CompVis make_ddim_timesteps; diffusers' steps_offset=1, which
        # StableDiffusionPipeline enforces, so an exported pipeline visits the same t):
        # (n - 1 - i) * (T // n) + 1, which never sees the last (noisiest) t.
        return (n - 1 - i) * (T // n) + 1
    # "trailing": round(T - i * T / n) - 1, starting at T - 1. Integer arithmetic with round-half-to-even,
    # where diffusers uses np.arange on floats; that agrees except at exact halves and for counts
    # (e.g. 61 of 1000) where float error makes diffusers return n + 1 timesteps ending at -1.
    q, r = torch.div(T * (n - i), n, rounding_mode="floor"), (T * (n - i)) % n
    round_up = (2 * r > n) | ((2 * r == n) & (q % 2 == 1))
    return q + round_up.long() - 1


def ddim_step(
    schedule: NoiseSchedule, v_pred: torch.Tensor, t: int, x_t: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """v_pred, x_t [B, C, h, w] -> x_prev [B, C, h, w]: deterministic DDIM step
    (eta = 0; Song et al. 2021, eq. 12)."""
    # The previous timestep is t - T // num_steps, as in diffusers' DDIMScheduler.step, for both spacings:
    # with "trailing" and num_steps not dividing T it can differ by one from the next timestep actually
    # visited, and the last step can stop at t = 0 (alphas_cumprod[0]) instead of the clean image.
    prev_t = t - schedule.num_train_timesteps // num_steps
    # set_alpha_to_one: past t = 0 the chain lands on the clean image (alpha-bar = 1).
    alpha_prev = schedule.alphas_cumprod[prev_t].item() if prev_t >= 0 else 1.0  # CPU float64 table:
    # no device sync
    t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    x0_pred = schedule.x0_from_v(x_t, v_pred, t_batch)
    eps_pred = schedule.eps_from_v(x_t, v_pred, t_batch)
    return math.sqrt(alpha_prev) * x0_pred + math.sqrt(1 - alpha_prev) * eps_pred


def rescale_guidance(v_cfg: torch.Tensor, v_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """v_cfg, v_cond [B, ...] -> [B, ...]: Lin et al. 2024, sec. 3.4 (diffusers' rescale_noise_cfg)."""
    # Strong guidance inflates the prediction's per-sample std past the conditional one (overexposed images);
    # rescale it back to the conditional std, then blend with the unrescaled result to avoid flat images.
    dims = list(range(1, v_cfg.ndim))
    v_rescaled = v_cfg * (v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * v_rescaled + (1 - guidance_rescale) * v_cfg


@torch.no_grad()
def ddim_sample(
    model,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    cond,
    uncond,
    num_steps: int = 50,
    cfg_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    spacing: str = "trailing",
) -> torch.Tensor:
    """noise [B, C, h, w], cond: a context [B, L, D] or the UNet's conditioning kwargs (batch B),
    uncond: the same for batch 1 or B, or None if cfg_scale == 1 -> latents [B, C, h, w]."""
    # model(x_t [B, C, h, w], t [B] long, cond) -> v [B, C, h, w]. The chain runs in float32
    # whatever autocast the caller wraps the model in: bf16 rounding would otherwise compound over the steps.
    x_t = noise.to(torch.float32)
    B = x_t.shape[0]
    guided = cfg_scale != 1
    if guided:
        if uncond is None:
            raise ValueError(f"uncond: required when cfg_scale != 1 (got cfg_scale={cfg_scale!r})")
        # Ho & Salimans 2022: one forward of 2B, unconditional half first (as diffusers' pipelines order it).
        cond_in = map_cond(lambda u, c: torch.cat([u.expand(B, *u.shape[1:]), c]), uncond, cond)
    for t in ddim_timesteps(schedule.num_train_timesteps, num_steps, spacing).tolist():
        if guided:
            t_in = torch.full((2 * B,), t, dtype=torch.long, device=x_t.device)
            v_uncond, v_cond = model(torch.cat([x_t, x_t]), t_in, cond_in).float().chunk(2)
            v_pred = v_uncond + cfg_scale * (v_cond - v_uncond)
            if guidance_rescale > 0:
                v_pred = rescale_guidance(v_pred, v_cond, guidance_rescale)
        else:
            t_in = torch.full((B,), t, dtype=torch.long, device=x_t.device)
            v_pred = model(x_t, t_in, cond).float()
        x_t = ddim_step(schedule, v_pred, t, x_t, num_steps)
    return x_t


def make_grid(images: torch.Tensor, nrow: int) -> PIL.Image.Image:
    """images [N, 3, H, W] in [-1, 1] -> one RGB image: rows of nrow images,
    2 px black padding around each."""
    pad = 2
    N, _, H, W = images.shape
    ncol = min(nrow, N)
    nrows = math.ceil(N / ncol)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(3, nrows * (H + pad) + pad, ncol * (W + pad) + pad, dtype=torch.uint8)
    for k in range(N):
        y, x = pad + (k // ncol) * (H + pad), pad + (k % ncol) * (W + pad)
        grid[:, y : y + H, x : x + W] = pixels[k]
    return PIL.Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy()))


def join_images(images: list[PIL.Image.Image], gap: int = 8, vertical: bool = False) -> PIL.Image.Image:
    """Images left to right (top to bottom if `vertical`), `gap` px of white between them, aligned on their
    top (left) edges; the rest of the canvas white, so images of different shapes share one PNG."""
    if vertical:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    else:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    out = PIL.Image.new("RGB", size, (255, 255, 255))
    offset = 0
    for image in images:
        out.paste(image, (0, offset) if vertical else (offset, 0))
        offset += (image.height if vertical else image.width) + gap
    return out


def make_side_by_side(batches: list[torch.Tensor], nrow: int, gap: int = 8) -> PIL.Image.Image:
    """Equal-shaped batches [N, 3, H, W] (e.g. EMA and raw weights, same prompts and seeds) -> one image:
    make_grid of each, left to right, `gap` px of white between them, so equal positions compare directly."""
    return join_images([make_grid(images, nrow) for images in batches], gap)


@torch.no_grad()
def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """-> [N, C, h, w]: one CPU generator per seed, so an image depends on its seed alone
    (any batch, any rank)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def size_error(width: int, height: int, downsample: int) -> str | None:
    """What is wrong with an image size in px for a VAE that downsamples by `downsample`, or None: both sides
    positive multiples of 8 x downsample, so the latent's sides are multiples of 8 (an SD UNet halves them
    three times)."""
    multiple = 8 * downsample
    if width > 0 and height > 0 and not width % multiple and not height % multiple:
        return None
    return (f"{width}x{height} px: expected positive multiples of {multiple} px (8 x the VAE's downsampling "
            f"factor {downsample})")


@torch.no_grad()
def generate(unet, frozen, schedule: NoiseSchedule, prompts: list[str], seeds: list[int], num_steps: int,
             cfg_scale: float, guidance_rescale: float, spacing: str, autocast: bool,
             batch_size: int = 32, size: tuple[int, int] | None = None, conditioning=None) -> torch.Tensor:
    """Text -> images [N, 3, H, W] in [-1, 1] with DDIM + CFG; `frozen` is models.FrozenModels. `size`:
    (width, height) in px; None: the UNet's square sample_size. `conditioning`: the kind of `frozen`
    (conditioning.make_conditioning), made here if not given."""
    device = next(unet.parameters()).device
    if size is None:
        size = (unet.config.sample_size * frozen.downsample,) * 2
    shape = (unet.config.in_channels, size[1] // frozen.downsample, size[0] // frozen.downsample)
    conditioning = conditioning or make_conditioning(frozen)
    uncond = conditioning.unconditional(1, size)

    def model(x_t, t, cond):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return unet(x_t, t, **cond).sample

    images = []
    for i in range(0, len(prompts), batch_size):
        noise = initial_noise(seeds[i:i + batch_size], shape).to(device)
        cond = conditioning.encode_prompts(prompts[i:i + batch_size], size)
        latents = ddim_sample(model, schedule, noise, cond, uncond, num_steps, cfg_scale, guidance_rescale,
                              spacing)
        images.append(frozen.decode_latents(latents).cpu())
    return torch.cat(images)


class LiveSamples:
    """The sample grids of a training run (sample.every), written to <out_dir>/samples/step_NNNNNNN.png.

    Prompts are split across ranks (seed fixed per prompt, so any world size draws the same grid) and gathered
    on rank 0; every rank samples about len(prompts) / world, so none waits long. Sampling uses its own copy
    of the UNet: the trained one (and its compiled graphs) stays put. With several sample.sizes, each prompt
    is drawn at each size with its own seed: one grid per size (EMA and raw side by side), top to bottom, the
    prompts in the same places in each. With a `reference` model (Diffusion-DPO's starting weights) its
    grid comes first, on the left: before and after, drawn once and kept."""

    def __init__(self, unet, frozen, schedule: NoiseSchedule, cfg: SampleConfig, out_dir: Path,
                 autocast: bool, conditioning=None, reference=None):
        for width, height in cfg.sizes:  # the config checked multiples of 8; here the VAE is known
            if error := size_error(width, height, frozen.downsample):
                raise ConfigError(f"sample.sizes: {error}")
        self.sizes = [tuple(s) for s in cfg.sizes] or [None]  # None: the UNet's square sample_size
        self.unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.frozen, self.schedule, self.cfg, self.autocast = frozen, schedule, cfg, autocast
        self.conditioning = conditioning or make_conditioning(frozen)
        self.reference, self.reference_grids = reference, None
        self.folder = out_dir / "samples"
        if dist.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, unet, ema, metrics) -> None:
        """Sample with the EMA and/or the raw weights of `unet` (sample.weights); every rank calls it."""
        prompts, world, rank = self.cfg.prompts, dist.world_size(), dist.rank()
        per_rank = math.ceil(len(prompts) / world)
        # This rank's prompts; the last rank pads with repeats of the final prompt so the gather is even.
        mine = [min(i, len(prompts) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        both = self.cfg.weights == "both"  # EMA left, raw right, same prompts and seeds
        grids = []  # grids[weights][size]: [len(prompts), 3, H, W]

        def draw(model) -> list[torch.Tensor]:
            drawn = []
            for size in self.sizes:  # one gather per size: every rank's images have that shape
                images = generate(model, self.frozen, self.schedule, [prompts[i] for i in mine],
                                  [self.cfg.seed + i for i in mine], self.cfg.steps, self.cfg.cfg_scale,
                                  self.cfg.guidance_rescale, self.cfg.spacing, autocast=self.autocast,
                                  size=size, conditioning=self.conditioning)
                drawn.append(dist.all_gather_tensor(images.to(dist.device()))[:len(prompts)].cpu())
            return drawn

        if self.reference is not None:
            self.reference_grids = self.reference_grids or draw(self.reference)
            grids.append(self.reference_grids)
        for use_ema in ([True, False] if both else [self.cfg.weights == "ema"]):
            if use_ema:
                ema.copy_to(self.unet)
            else:
                self.unet.load_state_dict(unet.state_dict())
            grids.append(draw(self.unet))
        if dist.is_main():
            path = self.folder / f"step_{step:07d}.png"
            nrow = math.ceil(math.sqrt(len(prompts)))
            rows = [make_side_by_side(batches, nrow) if len(grids) > 1 else make_grid(batches[0], nrow)
                    for batches in zip(*grids)]  # one per size
            (join_images(rows, vertical=True) if len(rows) > 1 else rows[0]).save(path)
            sizes = "; ".join(f"{w}x{h}" for w, h in self.cfg.sizes)
            caption = " | ".join(prompts) + (f"  (top to bottom: {sizes})" if len(rows) > 1 else "")
            columns = ["reference"] * (self.reference is not None) + (["EMA", "raw"] if both
                                                                      else [self.cfg.weights])
            metrics.log_image(step, path, caption + (f"  (left to right: {', '.join(columns)})"
                                                     if len(columns) > 1 else ""))
