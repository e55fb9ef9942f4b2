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
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config problem; the message is one line naming the key."""


Precision = Literal["bf16", "fp32"]


@dataclass
class ModelConfig:
    # sd: one CLIP text encoder (SD1.x/2.x); sdxl: two (text_encoder/, text_encoder_2/), a pooled embedding
    # and size/crop micro-conditioning (docs/sdxl.md)
    kind: Literal["sd", "sdxl"] = "sd"
    unet: str = "demo"  # builtin UNet config name (presets/unet_<name>.json), a config.json, or a UNet folder
    unet_init: str = ""  # start from a UNet folder (diffusers layout) or one of our checkpoints
    # (.safetensors); "" = random init from `unet`
    init_weights: str = "ema"  # a checkpoint's weights unet_init takes: ema | raw | ema:DECAY | ema:std=S
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on the UNet's attention projections, the rest
    # frozen (needs peft); 0: every weight (full fine-tuning)
    pretrained: str = "builtin:demo"  # folder or hub id with vae/, text_encoder/, tokenizer/ subfolders
    # (sdxl: also text_encoder_2/, tokenizer_2/)
    frozen_dtype: Precision = "bf16"  # dtype of the frozen VAE and text encoder
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers falls back to sdpa with one warning
    # if it fails
    gradient_checkpointing: bool = False
    vae_config: str = "demo"  # stage 1 (train_autoencoder.py):
    # builtin presets/vae_<name>.json or a config.json
    vae_kl_weight: float = 1e-6  # stage 1: weight of the KL term against the L1 + L2 reconstruction loss


@dataclass
class DataConfig:
    source: Literal["shapes", "shards", "folder", "parquet", "webdataset", "hf", "latents",
                    "shapes_pairs", "pairs", "pickapic"] = "shapes"  # the last three: preference pairs (dpo)
    path: str = ""  # local path or fsspec URL of the source; layouts in docs/data.md
    caption_column: str = "text"  # caption column (folder metadata, parquet, hf) or .json field (webdataset)
    image_column: str = "image"  # parquet/hf: column of encoded image bytes (or a struct with a bytes field)
    hf_split: str = "train"  # hf source: split of the `datasets` dataset at data.path
    hf_streaming: bool = False  # hf source: stream (no random access; resumes by fast-forward, docs/data.md)
    shuffle_window: int = 8  # sharded sources: shards whose samples are shuffled together (0 = all shards)
    bad_shard: Literal["stop", "skip"] = "stop"  # a shard that cannot be opened: stop, or skip on every rank
    resolution: int = 64  # px, square; with buckets, their pixel count (about resolution²)
    buckets: str | list = "off"  # aspect-ratio buckets: off | auto (1:4 to 4:1) | [[w, h], ...] px
    batch_per_gpu: int = 32  # images per micro-batch per process
    num_workers: int = 1  # DataLoader worker processes per rank (0 = load in the training process)
    seed: int = 0  # seeds the global sample order (and the synthetic shapes images)
    shapes_num_samples: int = 100_000  # size of the synthetic set (samples per epoch)
    crop: Literal["center", "random"] = "center"  # random: drawn from (data.seed, global position)
    random_flip: bool = False  # horizontal flip with probability 1/2, drawn like the crop


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
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
    schedule: Literal["constant", "cosine"] = "cosine"  # after warmup; cosine ends at min_lr_ratio * lr
    min_lr_ratio: float = 0.1


@dataclass
class EMAConfig:
    decay: float = 0.995  # decay per update of the default EMA (`--weights ema`)
    extra_decays: list = field(default_factory=list)  # more fixed decays kept beside it, e.g. [0.999, 0.9999]
    power_stds: list = field(default_factory=list)  # power-function EMAs (Karras et al. 2024) by sigma_rel,
    # e.g. [0.1]
    warmup: bool = True  # decay = min(decay, (1 + n) / (10 + n)) for update n,
    # so early EMA tracks the weights
    update_every: int = 1  # optimizer steps between EMA updates; ema.decay is per update


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"  # run folder: checkpoints/, samples/, metrics.jsonl
    max_steps: int = 1200  # optimizer steps
    global_batch: int = 0  # images per optimizer step; 0 = batch_per_gpu * world size (no accumulation)
    seed: int = 0  # seeds init and the per-step draws (noise, timesteps, caption dropout)
    precision: Precision = "bf16"  # bf16: autocast around the UNet, fp32 master weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    objective: Literal["diffusion", "dpo"] = "diffusion"  # dpo: Diffusion-DPO on preference pairs against
    # the frozen model.unet_init (docs/dpo.md)
    dpo_beta: float = 2500.0  # dpo: strength of the tie to the reference
    # (Wallace et al. 2023: 2500 for SD1.5)
    compile: Literal["auto", "off", "full", "regional"] = "auto"  # torch.compile of the UNet; auto: full on
    # CUDA (falls back to eager with a warning if it fails), off on CPU. docs/performance.md
    compile_vae: Literal["auto", "on", "off"] = "auto"  # torch.compile of the VAE's encoder where images are
    # encoded online (not from the latent cache), one static graph per input shape, channels-last; auto: on
    # on CUDA, off on CPU (true/false read as on/off)
    compile_text_encoder: Literal["on", "off"] = "off"  # torch.compile of the frozen text encoder(s), which
    # encode every batch's captions (from the latent cache too); docs/performance.md
    fp8: bool = False  # the UNet's transformer linears (attention projections, feed-forwards) trained in
    # float8 by torchao (needs a GPU with FP8 matmuls: Ada, Hopper or newer); docs/performance.md
    grad_reduce: Literal["fp32", "bf16"] = "fp32"  # DDP's gradient all-reduce; bf16: each rank's gradients
    # rounded to bf16 and summed in fp32, half the bytes on the wire (dist.reduce_in_bf16)
    shard_optimizer: Literal["off", "on"] = "off"  # on: no DDP; gradients reduce-scattered, each rank runs
    # AdamW on 1/world of the weights, which are then all-gathered (ZeRO stage 2; sharded_adamw.py)
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # the compiled UNet's forward and backward replayed as
    # CUDA graphs (train.compile=full on CUDA, one micro-batch per step); auto: on for one GPU and one shape
    startup_timeout_s: float = 600.0  # s; collective timeout until the first step is done,
    # and while a save runs
    collective_timeout_s: float = 120.0  # s; afterwards: a rank whose peer died or hangs stops within this
    max_consecutive_skips: int = 10  # steps in a row with non-finite loss/gradients (skipped)
    # before the run stops


@dataclass
class CkptConfig:
    every: int = 250  # optimizer steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept; the newest valid one is never deleted
    resume: str = "auto"  # auto (newest valid in out_dir) | none | path to a checkpoint
    on_save_error: Literal["stop", "continue"] = "stop"  # a save fails (disk full): stop (exit 5)
    # or warn and go on
    async_save: bool = True  # write in a background thread while training goes on; the final and the
    # preemption saves are waited for
    snapshot: Literal["auto", "device", "host"] = "auto"  # GPU: where the state is copied before it is
    # written (device: a second copy in GPU memory; host: pinned memory; auto: device if it fits beside the
    # training step's peak)
    remote: str = ""  # fsspec URL (s3://bucket/run, gs://..., file:///...): each checkpoint is also uploaded
    # there, verified, and resumed from on a machine without it


@dataclass
class LogConfig:
    every: int = 25  # optimizer steps between metric lines
    wandb: Literal["online", "offline", "disabled"] = "disabled"  # online falls back to offline, never
    # blocks; project and run name from WANDB_PROJECT / WANDB_NAME (default: ldm_ddp / out_dir's name)
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal, lines otherwise
    tensorboard: bool = False  # also write scalars and sample grids to <out_dir>/tensorboard
    # (needs tensorboard)
    wandb_checkpoints: Literal["off", "reference", "upload"] = "off"  # checkpoints as wandb artifacts
    profile_at: int = 0  # optimizer step from which torch.profiler records 3 steps into <out_dir>/profile;
    # 0 = off
    divergence_ratio: float = 2.0  # warn once the loss of 5 log intervals in a row is at least this times
    # its lowest 5-interval mean (a run that diverged and stayed there); 0 = off


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
    spacing: Literal["leading", "trailing"] = "trailing"
    weights: Literal["ema", "raw", "both"] = "ema"  # both: EMA (left) and raw (right) in one grid,
    # twice the work
    sizes: list = field(default_factory=list)  # [[width, height], ...] px, each prompt at each size
    # (multiples of 8 x the VAE's factor); [] = square data.resolution


@dataclass
class ValConfig:
    every: int = 0  # optimizer steps between validation losses (and one at the end); 0 = off
    num_samples: int = 256  # the held-out set: the first positions of its source's order
    source: str = ""  # its data.source kind; "" = the training one (docs/configuration.md)
    path: str = ""  # its data.path; "" = the training one
    seed: int = 1  # the set's order, noise and (shapes) images; for shapes, another seed: other images
    weights: Literal["ema", "raw"] = "ema"


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
    val: ValConfig = field(default_factory=ValConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as the field's type or raise ConfigError naming `key`.
    A Literal's values are the choices."""
    if isinstance(hint, types.UnionType):  # e.g. str | list: any of its types
        if not isinstance(value, get_args(hint)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__} {value!r}")
        return value
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        if isinstance(value, bool) and "on" in choices:  # an on/off switch given as true/false
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{key}: expected {' | '.join(choices)}, got {value!r}")
        return value
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


def _merge(cfg: Config, tree: dict, origin: str, unknown_keys: str = "refuse") -> None:
    """Set values from a {section: {key: value}} tree, checking names and types. unknown_keys="ignore" drops
    keys this version does not have (a checkpoint's config written by a release with other keys)."""
    for section, values in tree.items():
        if section not in cfg.__dataclass_fields__ or not isinstance(values, dict):
            raise ConfigError(f"{section}: unknown config section in {origin}")
        sub = getattr(cfg, section)
        hints = get_type_hints(type(sub))
        for key, value in values.items():
            if key not in hints:
                if unknown_keys == "ignore":
                    continue
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
    _merge(cfg, tree, "the checkpoint", unknown_keys="ignore")
    return cfg


def resolve_batch(cfg: Config, world_size: int) -> tuple[int, int]:
    """-> (grad_accum, global_batch) for this world size;
    ConfigError when the global batch does not divide."""
    per_step = cfg.data.batch_per_gpu * world_size
    if cfg.train.global_batch == 0:
        return 1, per_step
    if cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not divisible by "
                          f"data.batch_per_gpu * world_size = {per_step}")
    return cfg.train.global_batch // per_step, cfg.train.global_batch


def max_sample_steps(num_train_timesteps: int, spacing: str) -> int:
    """The most DDIM steps a spacing allows (sampling.ddim_timesteps):
    leading's offset of 1 would reach t = T."""
    return num_train_timesteps - (spacing == "leading")


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def warnings_for(cfg: Config) -> list[str]:
    """Settings that run but work against each other: one line each, printed at the start of a run."""
    found = []
    if cfg.diffusion.min_snr_gamma and cfg.diffusion.zero_terminal_snr:
        found.append("diffusion.min_snr_gamma with diffusion.zero_terminal_snr: min-SNR's weight "
                     "min(SNR, gamma) / (SNR + 1) is 0 at the last timestep and ~0 near it, the ones zero "
                     "terminal SNR is there to train; set diffusion.min_snr_gamma=0 for the plain v-loss")
    return found


def _fields(cfg: Config):
    """-> ("section.key", value) for every field."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for item in dataclasses.fields(sub):
            yield f"{section.name}.{item.name}", getattr(sub, item.name)


POSITIVE = ("val.num_samples", "data.resolution", "data.batch_per_gpu", "data.shapes_num_samples",
            "train.max_steps",
            "ckpt.every", "ckpt.keep", "log.every", "diffusion.num_train_timesteps", "ema.update_every",
            "sample.steps", "train.startup_timeout_s", "train.collective_timeout_s",
            "train.max_consecutive_skips")
NON_NEGATIVE = ("model.lora_rank", "data.num_workers", "data.shuffle_window", "train.global_batch",
                "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay", "diffusion.min_snr_gamma",
                "diffusion.offset_noise", "sample.every", "log.profile_at", "val.every")


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line, naming the key) for any value that cannot run. Types and choices are
    checked as values are set (_check_type); the dataclass defaults are valid."""
    for key, value in _fields(cfg):  # inf passes "> 0"; a NaN or inf lr, eps or timeout would fail mid-run
        numbers = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float)]
        _require(all(math.isfinite(v) for v in numbers), key, "finite numbers", value)
        _require(key not in POSITIVE or value > 0, key, "a positive number", value)
        _require(key not in NON_NEGATIVE or value >= 0, key, "a value >= 0", value)
    _require(cfg.optim.lr > 0, "optim.lr", "a positive learning rate", cfg.optim.lr)
    betas_ok = all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas)
    _require(len(cfg.optim.betas) == 2 and betas_ok, "optim.betas", "two numbers in [0, 1)", cfg.optim.betas)
    _require(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "a ratio in [0, 1]",
             cfg.optim.min_lr_ratio)
    _require(cfg.log.divergence_ratio == 0 or cfg.log.divergence_ratio > 1, "log.divergence_ratio",
             "0 (off) or a ratio above 1", cfg.log.divergence_ratio)
    _require(0 <= cfg.ema.decay < 1, "ema.decay", "a decay in [0, 1)", cfg.ema.decay)
    _require(all(isinstance(d, (int, float)) and 0 <= d < 1 for d in cfg.ema.extra_decays),
             "ema.extra_decays", "a list of decays in [0, 1)", cfg.ema.extra_decays)
    _require(all(isinstance(s, (int, float)) and 0 < s <= 0.28 for s in cfg.ema.power_stds), "ema.power_stds",
             "a list of sigma_rel values in (0, 0.28] (Karras et al. 2024)", cfg.ema.power_stds)
    _require(0 <= cfg.train.caption_dropout <= 1, "train.caption_dropout", "a probability",
             cfg.train.caption_dropout)
    _require(0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1, "diffusion.beta_end",
             "0 < beta_start < beta_end < 1", (cfg.diffusion.beta_start, cfg.diffusion.beta_end))
    _require(all(isinstance(p, str) for p in cfg.sample.prompts)
             and (cfg.sample.prompts or not cfg.sample.every),
             "sample.prompts", "a list of strings (at least one with sample.every > 0)", cfg.sample.prompts)
    # diffusers' pipelines guide only above 1: below it an exported pipeline would sample otherwise than ours
    _require(cfg.sample.cfg_scale >= 1, "sample.cfg_scale", "a guidance scale >= 1 (1: no guidance)",
             cfg.sample.cfg_scale)
    _require(0 <= cfg.sample.guidance_rescale <= 1, "sample.guidance_rescale", "a fraction in [0, 1]",
             cfg.sample.guidance_rescale)
    # the VAE's own multiple is checked where it is loaded (sampling.LiveSamples)
    _require(all(isinstance(s, list) and len(s) == 2
                 and all(type(x) is int and x > 0 and x % 8 == 0 for x in s) for s in cfg.sample.sizes),
             "sample.sizes", "a list of [width, height] in px, positive multiples of 8", cfg.sample.sizes)
    most = max_sample_steps(cfg.diffusion.num_train_timesteps, cfg.sample.spacing)
    _require(cfg.sample.steps <= most, "sample.steps", f"at most {most} ({cfg.sample.spacing} spacing of "
             f"{cfg.diffusion.num_train_timesteps} training timesteps)", cfg.sample.steps)
    _require(cfg.data.resolution % 8 == 0, "data.resolution", "a multiple of 8 px", cfg.data.resolution)
    buckets = cfg.data.buckets
    if isinstance(buckets, str):
        _require(buckets in ("off", "auto"), "data.buckets", "off | auto | a list of [width, height]",
                 buckets)
    else:
        from .data.buckets import check_buckets  # the VAE's own multiple is checked once it is loaded
        try:
            check_buckets(buckets, 8)
        except ValueError as err:
            raise ConfigError(f"data.buckets: {err}") from None
    _require(buckets == "off" or not (cfg.data.source == "hf" and cfg.data.hf_streaming), "data.buckets",
             "off with a streamed source (buckets need each image's size before training)", buckets)
    kinds = get_args(get_type_hints(DataConfig)["source"])
    _require(cfg.val.source in ("", *kinds), "val.source",
             f"\"\" or a data.source kind ({' | '.join(kinds)})", cfg.val.source)
    pairs = cfg.data.source in ("shapes_pairs", "pairs", "pickapic")  # a latent cache says so itself
    _require(pairs == (cfg.train.objective == "dpo") or cfg.data.source == "latents", "data.source",
             "a source of preference pairs (shapes_pairs | pairs | pickapic, or a latent cache of one) "
             "with train.objective = dpo, and only then", cfg.data.source)
    _require(cfg.train.objective != "dpo" or bool(cfg.model.unet_init), "model.unet_init",
             "the model to tune (a checkpoint or UNet folder) with train.objective = dpo: it is also the "
             "frozen reference", cfg.model.unet_init)
    _require(cfg.train.dpo_beta > 0, "train.dpo_beta", "a positive number", cfg.train.dpo_beta)
    # The reference runs in bf16: the trained model's FP8 rounding alone would move the reward from 0 at
    # step 0, and beta (2500) magnifies it.
    _require(not (cfg.train.fp8 and cfg.train.objective == "dpo"), "train.fp8",
             "false with train.objective = dpo (the bf16 reference would differ from the FP8 model by its "
             "rounding alone)", cfg.train.fp8)
    if cfg.data.source in ("shapes", "shapes_pairs"):
        _require(32 <= cfg.data.resolution <= 1024, "data.resolution", "32..1024 px for the shapes source",
                 cfg.data.resolution)
    if cfg.data.source not in ("shapes", "shapes_pairs"):  # URLs and patterns ({..}, *, a,b): the source's
        plain = "://" not in cfg.data.path and not any(c in cfg.data.path for c in "{*?[,")
        local = cfg.data.source != "hf" and plain  # an hf data.path may be a hub name
        _require(bool(cfg.data.path.strip()) and (not local or Path(cfg.data.path).exists()), "data.path",
                 f"an existing path or URL for the {cfg.data.source} source", cfg.data.path)
    for key, name, kind in (("model.unet", cfg.model.unet, "unet"),
                            ("model.vae_config", cfg.model.vae_config, "vae")):
        builtin = ", ".join(p.stem[len(kind) + 1:] for p in PRESET_DIR.glob(kind + "_*.json"))
        _require((PRESET_DIR / f"{kind}_{name}.json").exists() or Path(name).exists(), key,
                 f"a builtin {kind} config ({builtin}) or an existing path", name)
    init = Path(cfg.model.unet_init)
    _require(not cfg.model.unet_init or init.is_dir() or (init.is_file() and init.suffix == ".safetensors"),
             "model.unet_init", "a UNet folder (diffusers layout) or a training checkpoint (.safetensors)",
             cfg.model.unet_init)
    _require(cfg.train.global_batch % cfg.data.batch_per_gpu == 0, "train.global_batch",
             f"a multiple of data.batch_per_gpu = {cfg.data.batch_per_gpu}", cfg.train.global_batch)
