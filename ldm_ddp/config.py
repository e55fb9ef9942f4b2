"""Run configuration: dataclasses by section, TOML presets, `--section.key=value` overrides.

Defaults are the `demo` recipe, except precision (bf16, the GPU choice; the demo preset picks fp32
for CPUs); every field names its unit.
A bad config fails in `load_config`/`validate` before any work, with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config problem; the message is one line naming the key."""


@dataclass
class ModelConfig:
    unet: str = "demo"  # builtin UNet config name (presets/unet_<name>.json), a config.json, or a UNet folder
    unet_init: str = ""  # UNet folder (diffusers layout) to start from; "" = random init from `unet`
    pretrained: str = "builtin:demo"  # folder or hub id with vae/, text_encoder/, tokenizer/ subfolders
    frozen_dtype: str = "bf16"  # dtype of the frozen VAE and text encoder: bf16 | fp32
    attention: str = "sdpa"  # sdpa | xformers (falls back to sdpa with one warning if its kernels do not load)
    sdpa_backend: str = "auto"  # auto (PyTorch's choice) | flash | cudnn | efficient | math: the SDPA kernel
    gradient_checkpointing: bool = False
    vae_config: str = "demo"  # stage 1 (scripts/train_autoencoder.py): builtin presets/vae_<name>.json or a config.json
    vae_kl_weight: float = 1e-6  # stage 1: weight of the KL term against the L1 + L2 reconstruction loss


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes (built-in) | shards (make_shards.py) | latents (precompute_latents.py) | folder
    # | parquet | webdataset | hf
    path: str = ""  # local path or fsspec URL. shards: folder with index.json; folder: image folder (captions in
    # metadata.jsonl, metadata.csv or <image>.txt); parquet: folder of *.parquet, glob or comma-separated files;
    # webdataset: shards-{000..009}.tar or a folder; hf: save_to_disk folder, data file/folder or hub name
    caption_column: str = "text"  # caption column (folder: metadata.jsonl/.csv; parquet; hf; webdataset: .json field)
    image_column: str = "image"  # parquet/hf source: column of encoded image bytes (or a struct with a bytes field)
    min_size: int = 0  # folder source: px; images whose shorter side is smaller are left out of the index
    hf_split: str = "train"  # hf source: split of the `datasets` dataset at data.path (name, file or folder)
    hf_streaming: bool = False  # hf source: stream (no random access; resumes by fast-forward, see README)
    hf_shuffle_buffer: int = 1000  # hf streaming: samples in the shuffle buffer (0 = stream order)
    shuffle_window: int = 8  # sharded sources: shards whose samples are shuffled together (0 = all shards)
    bad_shard: str = "stop"  # a shard that cannot be opened: stop (one line naming it) | skip (on every rank alike)
    resolution: int = 64  # px, square
    batch_per_gpu: int = 32  # images per micro-batch per process
    num_workers: int = 1  # DataLoader worker processes per rank (0 = load in the training process)
    seed: int = 0  # seeds the global sample order
    shapes_seed: int = 0  # seeds the synthetic shapes images themselves
    shapes_num_samples: int = 100_000  # size of the synthetic set (samples per epoch)
    prefetch_batches: int = 4  # micro-batches prefetched per worker
    crop: str = "center"  # center | random (drawn from (data.seed, global position))
    random_flip: bool = False  # horizontal flip with probability 1/2, drawn like the crop
    max_image_pixels: int = 178_956_970  # px; larger images are refused as decompression bombs (PIL's default)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | cosine
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True  # Lin et al. 2024: rescale betas so the last timestep has SNR 0
    min_snr_gamma: float = 0.0  # Hang et al. 2023 loss weight; 0 = off (plain v-prediction MSE)
    offset_noise: float = 0.0  # std of the per-channel noise offset; 0 = off


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    warmup_steps: int = 50  # linear warmup, in optimizer steps
    schedule: str = "cosine"  # constant | cosine (after warmup, down to min_lr_ratio * lr at train.max_steps)
    min_lr_ratio: float = 0.1
    fused: bool = True  # fused AdamW (CPU and GPU); also skips a non-finite step on the device, no host sync


@dataclass
class EMAConfig:
    decay: float = 0.995  # target decay per update of the default EMA (`--weights ema`)
    extra_decays: list = field(default_factory=list)  # more fixed decays kept beside it, e.g. [0.999, 0.9999]
    power_stds: list = field(default_factory=list)  # power-function EMAs (Karras et al. 2024) by sigma_rel, e.g. [0.1]
    warmup: bool = True  # decay = min(decay, (1 + n) / (10 + n)) for update n, so early EMA tracks the weights
    update_every: int = 1  # optimizer steps between EMA updates; ema.decay is per update, so k multiplies the
    # average's span in steps by k (the power profiles span a fraction of the run either way)
    start_step: int = 0  # first step that updates the EMA (before it the EMA copies the weights)
    compile: bool = False  # torch.compile the update: inductor fuses its three passes over the weights into one;
    # off: measured on H200s from -4% to +6% of a step, no steady gain (docs/performance.md)
    overlap: bool = False  # the update runs on a side CUDA stream beside the next step's forward instead of after
    # the optimizer, meant bit-identical (EMA.defer_updates; +2-6% at 256 px on H200s). Off until
    # tests/test_ema.py's CUDA test has passed on a GPU (docs/performance.md)


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"  # run folder: checkpoints/, samples/, metrics.jsonl
    max_steps: int = 1200  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step per process
    global_batch: int = 0  # images per optimizer step; 0 = batch_per_gpu * world_size * grad_accum
    seed: int = 0  # seeds init and the per-step draws (noise, timesteps, caption dropout)
    precision: str = "bf16"  # bf16 (autocast, fp32 master weights) | fp32
    device: str = "auto"  # auto | cpu | cuda
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    channels_last: bool = True  # on CUDA only: the UNet's weights (and so its activations) channels-last
    layout_opt: str = "auto"  # auto | on | off: with train.compile=full on CUDA, inductor keeps activations and
    # gradients channels-last (speed.compile_model); auto: on where the UNet is one graph (one process, or
    # train.ddp_compile=whole), off for DDP's split graphs
    compile: str = "auto"  # auto (full on CUDA, off on CPU) | off | full | regional: torch.compile of the UNet
    # (ldm_ddp/speed.py); probed at start. The first step compiles, about 2 minutes for SD1.5 (docs/performance.md)
    compile_backend: str = "inductor"  # torch.compile's backend; aot_eager / eager are for debugging a compile
    # (dynamo's capture and AOT autograd without inductor's kernels / dynamo's capture alone)
    cudnn_benchmark: bool = True  # on CUDA: autotune each convolution shape once (the shapes are fixed for a run)
    ddp_static_graph: bool = False  # DDP static_graph (several ranks): the graph is the same every step; only with
    # grad_accum 1 (torch's static_graph breaks no_sync). Unmeasured on GPU, so off (docs/performance.md)
    ddp_bucket_cap_mb: float = 25.0  # DDP gradient bucket size, MB (torch's default); with train.ddp_compile=split
    # each bucket is also a graph break in the compiled backward
    ddp_compile: str = "whole"  # whole | split: how train.compile=full meets DDP (several ranks; speed.ddp_compile):
    # whole = one graph, all-reduce after the backward (measured faster); split = a graph per bucket, all-reduce
    # overlapping the backward (torch's default)
    fallback: bool = False  # a fast-path switch that fails at start (compile, attention kernel): warn and run
    # without it, instead of stopping with one line
    num_threads: int = 0  # torch CPU threads per process; 0 = torch default
    startup_timeout_s: float = 600.0  # s; collective timeout until the first step is done, and while a save runs
    collective_timeout_s: float = 120.0  # s; afterwards: a rank whose peer died or hangs stops within this
    max_consecutive_skips: int = 10  # steps in a row with non-finite loss/gradients (skipped) before the run stops


@dataclass
class CkptConfig:
    every: int = 250  # optimizer steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept; the newest valid one is never deleted
    resume: str = "auto"  # auto (newest valid in out_dir) | none | path to a checkpoint
    on_save_error: str = "stop"  # a save fails (disk full, I/O error): stop (exit 5) | continue (warn, retry later)


@dataclass
class LogConfig:
    every: int = 25  # optimizer steps between metric lines
    wandb: str = "disabled"  # online | offline | disabled (online falls back to offline, never blocks)
    wandb_project: str = "ldm_ddp"
    run_name: str = ""  # "" = out_dir's name
    progress: str = "auto"  # auto (bar on a terminal) | bar | lines
    peak_tflops: float = 0.0  # per-GPU peak, TFLOP/s, for MFU; 0 = 989 (H100 SXM dense bf16) on CUDA, no MFU on CPU
    tensorboard: bool = False  # also write scalars and sample grids to <out_dir>/tensorboard (needs tensorboard)
    wandb_checkpoints: str = "off"  # off | reference (a file:// link, no upload) | upload: checkpoints as artifacts
    profile_at: int = 0  # optimizer step from which torch.profiler records log.profile_steps steps into
    # <out_dir>/profile (Chrome trace, op table, device-busy summary); 0 = off
    profile_steps: int = 3


@dataclass
class SampleConfig:
    every: int = 250  # optimizer steps between live sample grids (and one at the end); 0 = off
    prompts: list = field(default_factory=lambda: [
        "a large red circle in the center", "a small blue square in the top left",
        "a large green triangle in the bottom right", "a small yellow circle in the top right",
        "a large purple square in the bottom left", "a small black triangle in the center",
        "a large blue triangle in the top left", "a small green square in the bottom right"])
    seed: int = 1234  # sample i uses seed + i
    steps: int = 25  # DDIM steps
    cfg_scale: float = 3.0
    guidance_rescale: float = 0.7
    spacing: str = "trailing"  # leading | trailing
    use_ema: bool = True
    side_by_side: bool = False  # with use_ema: EMA (left) and raw weights (right) in one grid; twice the sampling


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


CHOICES = {
    "model.frozen_dtype": ("bf16", "fp32"), "model.attention": ("sdpa", "xformers"),
    "model.sdpa_backend": ("auto", "flash", "cudnn", "efficient", "math"),
    "train.compile": ("auto", "off", "full", "regional"), "train.layout_opt": ("auto", "on", "off"),
    "train.ddp_compile": ("whole", "split"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "data.source": ("shapes", "shards", "folder", "parquet", "webdataset", "hf", "latents"),
    "data.bad_shard": ("stop", "skip"), "data.crop": ("center", "random"),
    "diffusion.beta_schedule": ("linear", "scaled_linear", "cosine"),
    "optim.schedule": ("constant", "cosine"), "train.precision": ("bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"), "log.wandb": ("online", "offline", "disabled"),
    "ckpt.on_save_error": ("stop", "continue"),
    "log.progress": ("auto", "bar", "lines"), "sample.spacing": ("leading", "trailing"),
    "log.wandb_checkpoints": ("off", "reference", "upload"),
}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as the field's type or raise ConfigError naming `key`."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # list
        ok = isinstance(value, list)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def _merge(cfg: Config, tree: dict, origin: str) -> None:
    """Set values from a {section: {key: value}} tree, checking names and types."""
    for section, values in tree.items():
        if section not in cfg.__dataclass_fields__ or not isinstance(values, dict):
            raise ConfigError(f"{section}: unknown config section in {origin}")
        sub = getattr(cfg, section)
        hints = get_type_hints(type(sub))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown config key in {origin}")
            setattr(sub, key, _check_type(f"{section}.{key}", value, hints[key]))


def _parse_override(arg: str) -> tuple[str, str, Any]:
    """`--section.key=value` -> (section, key, value); the value is read as TOML, else as a string."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"{arg}: expected --section.key=value")
    path, raw = body.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise ConfigError(f"--preset {name}: no such preset (known: {known})")
    return path


def load_config(config_file: str | None = None, overrides: list[str] = (), preset: str = "demo") -> Config:
    """Defaults <- preset <- --config file <- overrides, then validate()."""
    cfg = Config()
    files = [preset_path(preset)] + ([Path(config_file)] if config_file else [])
    for path in files:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"--config {path}: cannot read TOML ({err})") from None
        _merge(cfg, tree, str(path))
    for arg in overrides:
        section, key, value = _parse_override(arg)
        hints = get_type_hints(type(getattr(cfg, section))) if section in cfg.__dataclass_fields__ else {}
        if hints.get(key) is str and not isinstance(value, str):
            value = arg.split("=", 1)[1]  # e.g. --train.out_dir=123 stays a string
        _merge(cfg, {section: {key: value}}, "the command line")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a checkpoint's metadata)."""
    cfg = Config()
    _merge(cfg, tree, "the checkpoint")
    return cfg


def resolve_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """-> (grad_accum, global_batch) for this world size; ConfigError when the batch does not divide, or when
    train.ddp_static_graph meets gradient accumulation."""
    per_step = cfg.data.batch_per_gpu * world_size
    if cfg.train.global_batch == 0:
        accum = cfg.train.grad_accum
    elif cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not divisible by "
                          f"data.batch_per_gpu * world_size = {per_step}")
    else:
        accum = cfg.train.global_batch // per_step
        if cfg.train.grad_accum not in (1, accum):
            raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} contradicts train.global_batch "
                              f"{cfg.train.global_batch} (which implies {accum} at world size {world_size})")
    if cfg.train.ddp_static_graph and accum > 1:
        raise ConfigError(f"train.ddp_static_graph: needs grad_accum 1, this run accumulates {accum} micro-batches "
                          "(DDP's static_graph mis-counts gradients under no_sync, pytorch/pytorch#187732)")
    return accum, per_step * accum


def max_sample_steps(num_train_timesteps: int, spacing: str) -> int:
    """The most DDIM steps a spacing allows (sampling.ddim_timesteps): leading's offset of 1 would reach t = T."""
    return num_train_timesteps - (spacing == "leading")


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def warnings_for(cfg: Config) -> list[str]:
    """Settings that run but work against each other: one line each, printed at the start of a run."""
    found = []
    if cfg.diffusion.min_snr_gamma and cfg.diffusion.zero_terminal_snr:
        found.append("diffusion.min_snr_gamma with diffusion.zero_terminal_snr: min-SNR's weight "
                     "min(SNR, gamma) / (SNR + 1) is 0 at the last timestep and ~0 near it, the ones zero terminal "
                     "SNR is there to train; set diffusion.min_snr_gamma=0 for the plain v-loss")
    if cfg.train.layout_opt == "on" and cfg.train.compile in ("off", "regional"):
        found.append(f"train.layout_opt=on does nothing with train.compile={cfg.train.compile} (it applies to the "
                     "whole-UNet compile, train.compile=full or auto on CUDA)")
    if cfg.train.ddp_compile == "split" and cfg.train.compile in ("off", "regional"):
        found.append(f"train.ddp_compile={cfg.train.ddp_compile} does nothing with train.compile={cfg.train.compile} "
                     "(it decides how the whole-UNet compile meets DDP)")
    return found


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line, naming the key) for any value that cannot run."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, " | ".join(allowed), value)
    for section in dataclasses.fields(cfg):  # inf passes "> 0"; a NaN or inf lr, eps or timeout would fail mid-run
        for item in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), item.name)
            numbers = value if isinstance(value, list) else [value]
            _require(all(math.isfinite(v) for v in numbers if isinstance(v, float)), f"{section.name}.{item.name}",
                     "finite numbers", value)
    positive = ["data.resolution", "data.batch_per_gpu", "train.max_steps", "train.grad_accum",
                "ckpt.every", "ckpt.keep", "log.every", "diffusion.num_train_timesteps",
                "ema.update_every", "sample.steps", "data.shapes_num_samples", "data.prefetch_batches",
                "train.startup_timeout_s", "train.collective_timeout_s", "train.max_consecutive_skips",
                "data.max_image_pixels", "log.profile_steps", "train.ddp_bucket_cap_mb"]
    for key in positive:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value > 0, key, "a positive integer", value)
    non_negative = ["data.num_workers", "train.global_batch", "optim.warmup_steps", "sample.every",
                    "optim.grad_clip", "optim.weight_decay", "diffusion.min_snr_gamma",
                    "diffusion.offset_noise", "ema.start_step", "train.num_threads", "data.min_size",
                    "log.peak_tflops", "log.profile_at"]
    for key in non_negative:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value >= 0, key, "a value >= 0", value)
    _require(cfg.optim.lr > 0, "optim.lr", "a positive learning rate", cfg.optim.lr)
    betas_ok = all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas)
    _require(len(cfg.optim.betas) == 2 and betas_ok, "optim.betas", "two numbers in [0, 1)", cfg.optim.betas)
    _require(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "a ratio in [0, 1]", cfg.optim.min_lr_ratio)
    _require(0 <= cfg.ema.decay < 1, "ema.decay", "a decay in [0, 1)", cfg.ema.decay)
    _require(all(isinstance(d, (int, float)) and 0 <= d < 1 for d in cfg.ema.extra_decays), "ema.extra_decays",
             "a list of decays in [0, 1)", cfg.ema.extra_decays)
    _require(all(isinstance(s, (int, float)) and 0 < s <= 0.28 for s in cfg.ema.power_stds), "ema.power_stds",
             "a list of sigma_rel values in (0, 0.28] (Karras et al. 2024)", cfg.ema.power_stds)
    _require(0 <= cfg.train.caption_dropout <= 1, "train.caption_dropout", "a probability", cfg.train.caption_dropout)
    _require(0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1, "diffusion.beta_end",
             "0 < beta_start < beta_end < 1", (cfg.diffusion.beta_start, cfg.diffusion.beta_end))
    _require(all(isinstance(p, str) for p in cfg.sample.prompts) and (cfg.sample.prompts or not cfg.sample.every),
             "sample.prompts", "a list of strings (at least one with sample.every > 0)", cfg.sample.prompts)
    # diffusers' pipelines guide only above 1: below it an exported pipeline would sample otherwise than ours
    _require(cfg.sample.cfg_scale >= 1, "sample.cfg_scale", "a guidance scale >= 1 (1: no guidance)",
             cfg.sample.cfg_scale)
    _require(0 <= cfg.sample.guidance_rescale <= 1, "sample.guidance_rescale", "a fraction in [0, 1]",
             cfg.sample.guidance_rescale)
    most = max_sample_steps(cfg.diffusion.num_train_timesteps, cfg.sample.spacing)
    _require(cfg.sample.steps <= most, "sample.steps", f"at most {most} ({cfg.sample.spacing} spacing of "
             f"{cfg.diffusion.num_train_timesteps} training timesteps)", cfg.sample.steps)
    _require(cfg.data.resolution % 8 == 0, "data.resolution", "a multiple of 8 px", cfg.data.resolution)
    if cfg.data.source == "shapes":
        _require(32 <= cfg.data.resolution <= 1024, "data.resolution", "32..1024 px for the shapes source",
                 cfg.data.resolution)
    _require(cfg.data.shuffle_window >= 0, "data.shuffle_window", "shards per window >= 0", cfg.data.shuffle_window)
    _require(cfg.data.hf_shuffle_buffer >= 0, "data.hf_shuffle_buffer", "samples >= 0", cfg.data.hf_shuffle_buffer)
    if cfg.data.source != "shapes":  # URLs and patterns ({..}, *, a,b) are resolved by the source itself
        plain = "://" not in cfg.data.path and not any(c in cfg.data.path for c in "{*?[,")
        local = cfg.data.source != "hf" and plain  # an hf data.path may be a hub name
        _require(bool(cfg.data.path.strip()) and (not local or Path(cfg.data.path).exists()), "data.path",
                 f"an existing path or URL for the {cfg.data.source} source", cfg.data.path)
    for key, name, kind in (("model.unet", cfg.model.unet, "unet"), ("model.vae_config", cfg.model.vae_config, "vae")):
        _require((PRESET_DIR / f"{kind}_{name}.json").exists() or Path(name).exists(), key,
                 f"a builtin {kind} config ({', '.join(p.stem[len(kind) + 1:] for p in PRESET_DIR.glob(kind + '_*.json'))})"
                 " or an existing path", name)
    _require(not cfg.model.unet_init or Path(cfg.model.unet_init).is_dir(), "model.unet_init",
             "a UNet folder (diffusers layout)", cfg.model.unet_init)
    if cfg.train.global_batch:  # the exact split needs the world size: resolve_batch() at launch
        _require(cfg.train.global_batch % cfg.data.batch_per_gpu == 0, "train.global_batch",
                 f"a multiple of data.batch_per_gpu = {cfg.data.batch_per_gpu}", cfg.train.global_batch)
        _require(cfg.train.global_batch % (cfg.data.batch_per_gpu * cfg.train.grad_accum) == 0, "train.grad_accum",
                 "1 or a divisor of train.global_batch / data.batch_per_gpu", cfg.train.grad_accum)
    _require(not cfg.train.ddp_static_graph or cfg.train.grad_accum == 1, "train.ddp_static_graph",
             "false with train.grad_accum > 1 (DDP's static_graph breaks under no_sync)", cfg.train.ddp_static_graph)
