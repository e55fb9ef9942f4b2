"""DDIM sampling with classifier-free guidance, checked against diffusers' DDIMScheduler and
rescale_noise_cfg; image grids; sampling at sizes other than the square training resolution
(scripts/sample.py, live samples, sample.sizes)."""

import numpy as np
import pytest
import torch
from conftest import run_main, train_here
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
)
from PIL import Image

from ldm_ddp.config import ConfigError, load_config
from ldm_ddp.sampling import (
    LiveSamples,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    generate,
    join_images,
    make_grid,
    make_side_by_side,
    rescale_guidance,
)
from ldm_ddp.schedule import NoiseSchedule

T = 1000


def diffusers_ddim(spacing: str, zero_snr: bool, float64_tables: bool = False) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
        # as the exported pipeline (StableDiffusionPipeline enforces it); shifts "leading" only
        steps_offset=1,
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
    )
    if float64_tables:
        # diffusers keeps alphas_cumprod in float32 and takes sqrt there (~1e-6 drift over a trajectory); the
        # table values equal ours (test_schedule), so upcasting them compares the step formulas alone.
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


# leading with T steps would reach t = T: refused (test_ddim_timesteps_bad_args)
@pytest.mark.parametrize("spacing, num_steps", [(s, n) for s in ("leading", "trailing")
                                                for n in (1, 2, 3, 7, 10, 20, 25, 50, 100, 999, 1000)
                                                if (s, n) != ("leading", 1000)])
def test_ddim_timesteps_equal_diffusers(spacing, num_steps):
    scheduler = diffusers_ddim(spacing, zero_snr=False)
    scheduler.set_timesteps(num_steps)
    ours = ddim_timesteps(T, num_steps, spacing)
    assert ours.dtype == torch.long
    assert torch.equal(ours, scheduler.timesteps)


def test_trailing_timesteps_all_counts():
    # Every count gives num_steps distinct descending timesteps in [0, T), from T - 1. diffusers agrees
    # wherever its float np.arange gives num_steps values (for 62 counts of 1000, e.g. 61, it gives one more,
    # ending at -1), except by one at exact halves, where its rounding follows float error and ours rounds
    # half to even.
    scheduler = diffusers_ddim("trailing", zero_snr=False)
    for n in range(1, T + 1):
        ours = ddim_timesteps(T, n, "trailing")
        assert len(ours) == n and ours[0] == T - 1 and ours[-1] >= 0
        assert (ours[:-1] > ours[1:]).all()
        scheduler.set_timesteps(n)
        if len(scheduler.timesteps) == n:
            at_half = (2 * T * (n - torch.arange(n))) % (2 * n) == n
            differs = ours != scheduler.timesteps
            assert not (differs & ~at_half).any(), n
            assert ((ours - scheduler.timesteps).abs() <= 1).all(), n


@pytest.mark.parametrize(
    "num_steps,spacing,name", [(0, "trailing", "num_steps"), (T + 1, "trailing", "num_steps"),
                               (T, "leading", "num_steps"), (10, "linspace", "spacing")]
)
def test_ddim_timesteps_bad_args(num_steps, spacing, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        ddim_timesteps(T, num_steps, spacing)


@pytest.mark.parametrize("num_steps", [50, 7])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_trajectory_matches_diffusers(spacing, zero_snr, num_steps):
    schedule = NoiseSchedule(T, "scaled_linear", zero_terminal_snr=zero_snr)
    scheduler = diffusers_ddim(spacing, zero_snr, float64_tables=True)
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(0)
    x_ours = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x_theirs = x_ours.clone()
    for t in scheduler.timesteps:
        v_pred = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        x_ours = ddim_step(schedule, v_pred, int(t), x_ours, num_steps)
        x_theirs = scheduler.step(v_pred, t, x_theirs).prev_sample
        assert x_ours.dtype == torch.float64
        assert (x_ours - x_theirs).abs().max() < 1e-6, int(t)


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_rescale_guidance_matches_diffusers(guidance_rescale):
    g = torch.Generator().manual_seed(0)
    v_cfg, v_cond = torch.randn(3, 4, 8, 8, generator=g) * 3, torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(
        rescale_guidance(v_cfg, v_cond, guidance_rescale), rescale_noise_cfg(v_cfg, v_cond, guidance_rescale)
    )


class LinearModel:
    """A fixed map (x_t [B, C, h, w], t [B], cond [B, L, D]) -> v [B, C, h, w] that records each batch
    size."""

    def __init__(self, out_dtype=torch.float32):
        self.batch_sizes, self.out_dtype = [], out_dtype

    def __call__(self, x_t, t, cond):
        self.batch_sizes.append(x_t.shape[0])
        scale = 0.5 + t.to(x_t.dtype)[:, None, None, None] / (2 * T)
        shift = cond.mean(dim=(1, 2))[:, None, None, None]
        return (scale * x_t + shift).to(self.out_dtype)


def reference_sample(model, scheduler, noise, cond, uncond, num_steps, cfg_scale, guidance_rescale):
    """The diffusers pipeline loop: one forward per branch, DDIMScheduler.step."""
    scheduler.set_timesteps(num_steps)
    x_t = noise.clone()
    B = x_t.shape[0]
    for t in scheduler.timesteps:
        v_cond = model(x_t, t.expand(B), cond)
        if cfg_scale == 1:
            v_pred = v_cond
        else:
            v_uncond = model(x_t, t.expand(B), uncond.expand(B, -1, -1))
            v_pred = v_uncond + cfg_scale * (v_cond - v_uncond)
            if guidance_rescale > 0:
                v_pred = rescale_noise_cfg(v_pred, v_cond, guidance_rescale)
        x_t = scheduler.step(v_pred, t, x_t).prev_sample
    return x_t


@pytest.mark.parametrize(
    "spacing,zero_snr,num_steps,cfg_scale,guidance_rescale",
    [("trailing", True, 10, 7.5, 0.7), ("trailing", False, 7, 4.0, 0.0), ("leading", False, 25, 1.0, 0.0)],
)
def test_ddim_sample_matches_manual_diffusers_loop(spacing, zero_snr, num_steps, cfg_scale, guidance_rescale):
    schedule = NoiseSchedule(T, "scaled_linear", zero_terminal_snr=zero_snr)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g)
    model = LinearModel()
    ours = ddim_sample(model, schedule, noise, cond, uncond if cfg_scale != 1 else None, num_steps, cfg_scale,
                       guidance_rescale, spacing)
    assert model.batch_sizes == [4 if cfg_scale != 1 else 2] * num_steps  # cond and uncond in one forward
    expected = reference_sample(LinearModel(), diffusers_ddim(spacing, zero_snr), noise, cond, uncond,
                                num_steps,
                                cfg_scale, guidance_rescale)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_ddim_sample_runs_in_float32_for_low_precision_models():
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    latents = ddim_sample(LinearModel(torch.bfloat16), NoiseSchedule(), noise, cond, torch.zeros(1, 5, 6), 5)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_ddim_sample_needs_uncond_for_guidance():
    with pytest.raises(ValueError, match="^uncond: "):
        ddim_sample(LinearModel(), NoiseSchedule(), torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 6),
                    None, 5, 7.5)


def test_make_grid():
    images = torch.cat([torch.ones(3, 3, 8, 6), -torch.ones(2, 3, 8, 6)])
    grid = make_grid(images, nrow=3)
    # PIL size is (width, height)
    assert grid.mode == "RGB" and grid.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
    assert grid.getpixel((0, 0)) == (0, 0, 0)  # padding
    assert grid.getpixel((2, 2)) == (255, 255, 255)  # first image, value 1
    assert grid.getpixel((2, 2 + 8 + 2)) == (0, 0, 0)  # fourth image (second row), value -1
    assert make_grid(images[:2], nrow=4).size == (2 * (6 + 2) + 2, 8 + 2 + 2)


def test_make_side_by_side():
    """Two batches (EMA, raw) -> their grids left to right with a white gap: equal positions, same prompt
    and seed."""
    ema, raw = torch.ones(3, 3, 8, 6), torch.zeros(3, 3, 8, 6)
    image = make_side_by_side([ema, raw], nrow=2, gap=5)
    left = make_grid(ema, nrow=2)  # 2 x 2 cells, the last one empty
    assert image.size == (2 * left.width + 5, left.height)
    assert image.crop((0, 0, left.width, left.height)).tobytes() == left.tobytes()
    assert image.getpixel((left.width + 2, 2)) == (255, 255, 255)  # the gap
    x0 = left.width + 5
    assert image.getpixel((x0, 0)) == (0, 0, 0)  # the raw grid's own padding
    assert image.getpixel((x0 + 2, 2)) == (128, 128, 128)  # first raw image, value 0
    assert image.getpixel((x0 + 2, 2 + 8 + 2)) == (128, 128, 128)  # third raw image (second row)
    assert image.getpixel((x0 + 2 + 6 + 2, 2 + 8 + 2)) == (0, 0, 0)  # the empty fourth cell


def test_join_images_of_different_shapes():
    """Grids of two sizes, top to bottom on white, left-aligned; then two such columns side by side."""
    wide, tall = make_grid(torch.ones(2, 3, 4, 10), nrow=2), make_grid(-torch.ones(2, 3, 10, 4), nrow=2)
    column = join_images([wide, tall], gap=3, vertical=True)
    assert column.size == (wide.width, wide.height + 3 + tall.height)
    assert column.crop((0, 0, *wide.size)).tobytes() == wide.tobytes()
    assert column.crop((0, wide.height + 3, tall.width, column.height)).tobytes() == tall.tobytes()
    assert column.getpixel((0, wide.height + 1)) == (255, 255, 255)  # the gap
    assert column.getpixel((column.width - 1, column.height - 1)) == (255, 255, 255)  # beside the narrow grid
    pair = join_images([column, column], gap=5)
    assert pair.size == (2 * column.width + 5, column.height)
    assert join_images([wide]).tobytes() == wide.tobytes()


def sample_setup(trained_run, **sample):
    """-> (the trained run's config with `sample` changes, its raw UNet, frozen models, schedule)."""
    from ldm_ddp.models import load_trained

    cfg, unet, frozen = load_trained(str(trained_run / "checkpoints" / "step_0000002.safetensors"), "raw",
                                     torch.device("cpu"))
    for key, value in sample.items():
        setattr(cfg.sample, key, value)
    d = cfg.diffusion
    return cfg, unet, frozen, NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                                            d.zero_terminal_snr)


class ImageLog:
    """Metrics' log_image alone: keeps the captions."""

    def __init__(self):
        self.captions = []

    def log_image(self, step, path, caption):
        self.captions.append(caption)


def test_live_samples_at_two_sizes(tmp_path, trained_run):
    """sample.sizes: each prompt at each size with its own seed, one block per size; the square block is the
    default grid, pixel for pixel."""
    prompts = ["a large red circle in the center", "a small blue square in the top left",
               "a large green triangle in the bottom right"]
    cfg, unet, frozen, schedule = sample_setup(trained_run, prompts=prompts, weights="raw", steps=2,
                                               sizes=[[128, 64], [64, 64]])
    log = ImageLog()
    LiveSamples(unet, frozen, schedule, cfg.sample, tmp_path / "sizes", autocast=False)(3, unet, None, log)
    grid = np.asarray(Image.open(tmp_path / "sizes" / "samples" / "step_0000003.png"))
    # 3 prompts in 2 x 2 cells of 128x64 px, 8 px of white, then 2 x 2 cells of 64 px (2 px padding)
    assert grid.shape == (2 * 66 + 2 + 8 + 2 * 66 + 2, 2 * 130 + 2, 3)
    assert "top to bottom: 128x64; 64x64" in log.captions[0]
    wide = generate(unet, frozen, schedule, prompts, [cfg.sample.seed + i for i in range(3)], 2,
                    cfg.sample.cfg_scale, cfg.sample.guidance_rescale, cfg.sample.spacing, autocast=False,
                    size=(128, 64))
    assert wide.shape == (3, 3, 64, 128)
    assert np.array_equal(grid[:134], np.asarray(make_grid(wide, nrow=2)))

    cfg.sample.sizes = []
    LiveSamples(unet, frozen, schedule, cfg.sample, tmp_path / "square", autocast=False)(3, unet, None, log)
    square = np.asarray(Image.open(tmp_path / "square" / "samples" / "step_0000003.png"))
    assert np.array_equal(grid[134 + 8:, :134], square)
    assert (grid[134 + 8:, 134:] == 255).all()  # beside the narrower block


def test_live_samples_refuse_a_size_the_vae_cannot_take(tmp_path, trained_run):
    cfg, unet, frozen, schedule = sample_setup(trained_run, sizes=[[128, 64], [96, 64]])
    with pytest.raises(ConfigError, match=r"^sample.sizes: 96x64 px: expected positive multiples of 64 px"):
        LiveSamples(unet, frozen, schedule, cfg.sample, tmp_path, autocast=False)


@pytest.mark.parametrize("sizes", ["[[60, 64]]", "[64, 64]", "[[64]]", "[[0, 64]]", "[[64.0, 64]]",
                                   "[[true, 64]]", "[[64, 64, 64]]"])
def test_sample_sizes_validation(sizes):
    with pytest.raises(ConfigError, match=r"^sample.sizes: expected a list of \[width, height\] in px"):
        load_config(overrides=[f"--sample.sizes={sizes}"])
    assert load_config(overrides=["--sample.sizes=[[512, 256], [64, 64]]"]).sample.sizes == [[512, 256],
                                                                                              [64, 64]]


def test_sample_script_at_a_non_square_size(tmp_path, trained_run, capsys):
    ckpt = trained_run / "checkpoints" / "step_0000002.safetensors"
    prompts = ["--prompt", "a large red circle in the center", "--prompt",
               "a small blue square in the top left"]
    out = tmp_path / "wide.png"
    assert run_main("sample", ckpt, *prompts, "--n", "2", "--steps", "2", "--width", "128", "--height", "64",
                    "--out", out) == 0
    assert "4 images of 128x64 px" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (2 * 66 + 2, 2 * 130 + 2, 3)  # a row per prompt
    for bad in (["--width", "96"], ["--height", "0"]):
        assert run_main("sample", ckpt, *prompts, *bad, "--out", tmp_path / "bad.png") == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: --width/--height: ") and "64 px" in error[0]
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.slow
def test_live_samples_at_two_sizes_are_the_same_for_any_world_size(tmp_path, tiny_args, run_script):
    """As the square grid (test_train), the grid at several sizes does not depend on how prompts are split
    across ranks, with EMA and raw weights side by side."""
    from test_train import check

    prompts = ["a large red circle in the center", "a small blue square in the top left",
               "a large green triangle in the bottom right"]
    common = {"train__max_steps": 1, "sample__every": 1, "sample__prompts": prompts, "optim__lr": 1e-20,
              "optim__weight_decay": 0.0, "ckpt__every": 1, "sample__weights": "both",
              "sample__sizes": [[128, 64], [64, 128]]}
    grids = []
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}"
        if nproc == 1:
            train_here(*tiny_args(out, data__batch_per_gpu=4, **common))
        else:
            check(run_script("scripts/train.py", *tiny_args(out, data__batch_per_gpu=2, **common), nproc=2,
                             timeout=150))
        grids.append(np.asarray(Image.open(out / "samples" / "step_0000001.png"), dtype=np.int16))
    # 2 x 2 cells of 128x64 px for EMA and for raw, 8 px apart; 8 px below, the same at 64x128 px
    wide = (2 * 66 + 2, 2 * 130 + 2)
    assert grids[0].shape == grids[1].shape == (wide[0] + 8 + 2 * 130 + 2, 2 * wide[1] + 8, 3)
    assert (grids[0][:wide[0], wide[1]:wide[1] + 8] == 255).all()  # between EMA and raw
    assert (grids[0][wide[0]:wide[0] + 8] == 255).all()  # between the sizes
    assert np.abs(grids[0] - grids[1]).max() <= 2  # batch composition may change float rounding, not images
