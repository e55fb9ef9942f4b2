"""Build or load the UNet, VAE, text encoder and tokenizer; freeze; encode images and prompts.

diffusers supplies the model classes, transformers the text encoder and tokenizer; nothing
else of theirs (no pipelines, no schedulers) is used in training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from .config import ConfigError, ModelConfig
from .data.transforms import to_unit_range

# Library chatter (the accelerate hint, weight-loading progress bars) is not the user's business;
# real errors still raise.
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PRESET_DIR = Path(__file__).parent / "presets"
ASSET_DIR = Path(__file__).parent / "assets"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_pretrained(name: str) -> str:
    """`builtin:<name>` -> the folder shipped in ldm_ddp/assets; anything else is a folder or hub id."""
    if name.startswith("builtin:"):
        path = ASSET_DIR / name.split(":", 1)[1]
        if not path.is_dir():
            raise ConfigError(f"model.pretrained: no built-in model bundle {name!r} ({path} missing)")
        return str(path)
    return name


def unet_config(name: str) -> dict:
    """A builtin UNet config name, a config.json path, or a folder holding config.json -> dict."""
    builtin = PRESET_DIR / f"unet_{name}.json"
    path = builtin if builtin.exists() else Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.unet: {name!r} is neither a builtin UNet config nor a config.json")
    return json.loads(path.read_text())


def trains_channels_last(device: torch.device) -> bool:
    """The UNet trains channels-last on CUDA (cuDNN's fast convolutions for bf16); on CPU contiguous."""
    return device.type == "cuda"


def build_unet(cfg: ModelConfig, latent_size: int, cross_attention_dim: int,
               device: torch.device | str = "cpu", pooled_width: int = 0) -> UNet2DConditionModel:
    """Random-init UNet from `cfg.unet` (or load `cfg.unet_init`), in fp32, train mode, on `device` (where the
    attention backend is probed: xformers has CUDA kernels only), channels-last on CUDA. `pooled_width`:
    SDXL's pooled text embedding width, which its added "text_time" embedding takes with the 6 size/crop ids;
    0: no such embedding (SD1.x/2.x)."""
    if cfg.unet_init.endswith(".safetensors"):
        unet = checkpoint_unet(cfg.unet_init, cfg.init_weights)[1]
    elif cfg.unet_init:
        unet = UNet2DConditionModel.from_pretrained(cfg.unet_init, torch_dtype=torch.float32)
    else:
        config = unet_config(cfg.unet)
        config["sample_size"] = latent_size
        # drawn on the CPU: one seed gives the same start on any machine and every rank (the EMA copies are
        # made before DDP's broadcast); SDXL's 2.57 B weights take ~30 s on 2 cores
        unet = UNet2DConditionModel.from_config(config)
    if unet.config.cross_attention_dim != cross_attention_dim:
        raise ConfigError(f"model.unet: cross_attention_dim {unet.config.cross_attention_dim} does not match "
                          f"the text encoder's hidden size {cross_attention_dim}")
    if error := added_embedding_mismatch(unet.config, pooled_width):
        raise ConfigError(f"model.unet: {error}")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device)
    if trains_channels_last(unet.device):  # set before the optimizer moments and EMA copies are made and
        # loaded: they take the weights' strides (fused AdamW on CUDA refuses moments of other strides)
        unet.to(memory_format=torch.channels_last)
    set_attention(unet, cfg.attention)
    return unet.train()


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every transformer block


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """Freeze `unet` and give its attention projections trainable LoRA adapters (peft) of `rank`, alpha = rank
    (scale 1); the adapters' B starts at zero, so the model starts as it was. Their weights are named
    `<layer>.lora_A.default.weight` / `lora_B`, the frozen ones `<layer>.base_layer.weight`; merge_lora turns
    such weights back into a plain UNet's."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("model.lora_rank: LoRA needs peft (pip install peft)") from None
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))


def merge_lora(state: dict) -> dict:
    """UNet weights with LoRA adapters (add_lora's names) -> a plain UNet's: W + B @ A for each adapted
    layer (scale 1); weights without adapters pass as they are."""
    merged = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        prefix, found, leaf = name.partition(".base_layer.")
        if found and leaf == "weight":
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = (value.float() + b.float() @ a.float()).to(value.dtype)
        merged[f"{prefix}.{leaf}" if found else name] = value
    return merged


def added_embedding_mismatch(config, pooled_width: int) -> str | None:
    """Why a UNet config does not take (pooled_width > 0) or does take (0) SDXL's added conditioning, or
    None: its "text_time" embedding reads the pooled embedding and 6 size/crop ids, each embedded to
    addition_time_embed_dim sinusoidal features (Podell et al. 2023, section 2.2)."""
    kind = config.get("addition_embed_type")
    if not pooled_width:
        return None if kind is None else f"addition_embed_type {kind!r} needs model.kind = \"sdxl\""
    if kind != "text_time":
        return f"model.kind = \"sdxl\" needs addition_embed_type \"text_time\", not {kind!r}"
    expected = pooled_width + 6 * (config.get("addition_time_embed_dim") or 0)
    if config.get("projection_class_embeddings_input_dim") != expected:
        got = config.get("projection_class_embeddings_input_dim")
        return (f"projection_class_embeddings_input_dim {got} is not the pooled width {pooled_width} + 6 x "
                f"addition_time_embed_dim = {expected}")
    return None


def set_attention(unet: UNet2DConditionModel, backend: str) -> str:
    """Use xformers if asked and its kernels really run on the UNet's device (probed once); otherwise PyTorch
    SDPA."""
    if backend == "xformers":
        try:
            import xformers.ops
            q = torch.zeros(1, 8, 1, 64, device=unet.device, dtype=torch.float16)
            xformers.ops.memory_efficient_attention(q, q, q)  # raises if the kernels did not load
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as err:  # ImportError, NotImplementedError, RuntimeError from missing kernels
            print(f"warning: xformers unavailable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                  "using PyTorch SDPA")
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


@dataclass
class FrozenModels:
    """The frozen parts of an LDM: VAE, text encoder(s) and tokenizer(s), in eval mode without grads."""
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scaling_factor: float
    dtype: torch.dtype
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second encoder (and pooled embedding)
    tokenizer_2: object = None

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[B] captions -> input_ids [B, L], padded to the tokenizer's model_max_length."""
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> text embeddings [B, L, D] in fp32 (the UNet's cross-attention context)."""
        # non_blocking: the loader's ids are pinned, and a blocking copy would wait for the whole queued step
        return self.text_encoder(input_ids.to(self.text_encoder.device, non_blocking=True))[0].float()

    def latents_of(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        """A loader batch -> scaled latents [B, C, h, w] fp32: drawn from the latent cache's moments, or by
        encoding its images (the same draw either way)."""
        if "moments" in batch:
            return self.latents_from_moments(batch["moments"].to(self.vae.device, non_blocking=True),
                                             generator)
        return self.encode_images(batch["images"].to(self.vae.device, non_blocking=True), generator)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """images [B, 3, H, W], uint8 pixels (the loader's) or float in [-1, 1]
        -> scaled latents [B, C, H/f, W/f] fp32.

        Draws from the posterior with our own generator (not the VAE's global-RNG `.sample()`)
        so the draw is a function of (seed, step, rank) like every other per-step draw.
        """
        images = to_unit_range(images.to(self.vae.device))  # uint8 -> [-1, 1] here, on the device
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return self._draw(posterior.mean.float(), posterior.std.float(), generator)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (uint8 or [-1, 1]) -> posterior moments [B, 2C, h, w] fp16: mean, then
        log-variance (as diffusers clamps it), what the latent cache stores."""
        posterior = self.vae.encode(to_unit_range(images.to(self.vae.device)).to(self.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1).half()

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Cached moments [B, 2C, h, w] -> scaled latents [B, C, h, w] fp32: the same draw (and generator
        use) as encode_images makes from the VAE's posterior."""
        mean, logvar = moments.to(self.vae.device).float().chunk(2, dim=1)
        return self._draw(mean, torch.exp(0.5 * logvar), generator)

    def _draw(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A scaled latent from the posterior N(mean, std^2), or its mean without a generator."""
        if generator is None:
            return mean * self.scaling_factor
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1], fp32."""
        images = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return images.float().clamp(-1, 1)


def load_trained(path: str, weights: str, device: torch.device, frozen_dtype: str = ""):
    """A training checkpoint -> (its Config, its UNet in eval mode, FrozenModels).

    `weights`: raw, ema (the default EMA), or one of the checkpoint's other EMA profiles:
    ema:0.9999, ema:std=0.1.
    `frozen_dtype`: the VAE's and text encoder's dtype; "" = the run's model.frozen_dtype (export asks for
    fp32, so that it writes the pretrained weights themselves, not their bf16 rounding).
    """
    from .config import config_from_dict

    meta, unet = checkpoint_unet(path, weights)
    cfg = config_from_dict(meta["config"])
    frozen = load_frozen(cfg.model.pretrained, frozen_dtype or cfg.model.frozen_dtype, device, cfg.model.kind)
    unet.to(device)
    set_attention(unet, cfg.model.attention)
    return cfg, unet.eval().requires_grad_(False), frozen


def checkpoint_unet(path: str, weights: str) -> tuple[dict, UNet2DConditionModel]:
    """A training checkpoint -> (its metadata, its UNet with `weights` as load_trained reads them), fp32."""
    from .checkpoint import load_checkpoint, module_tensors
    from .ema import weights_prefix

    tensors, meta = load_checkpoint(path)
    part = weights_prefix(meta.get("ema", {}), weights)  # ConfigError naming the profiles it has
    named = module_tensors(tensors, part)
    if not named:  # e.g. a stage-1 (autoencoder) checkpoint: the random UNet would sample noise
        # without a word
        raise ConfigError(f"{path}: no UNet weights ({part}.*) in this checkpoint; is it a stage-1 (VAE) "
                          "checkpoint?")
    unet = UNet2DConditionModel.from_config(meta["architecture"]["unet"])  # the UNet as it was built
    # EMA holds the parameters (with LoRA, the adapters'); the rest comes from the raw weights
    unet.load_state_dict({**unet.state_dict(), **merge_lora({**module_tensors(tensors, "unet"), **named})})
    return meta, unet


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.to(device=device, dtype=dtype).eval()


def load_frozen(pretrained: str, frozen_dtype: str, device: torch.device, kind: str = "sd") -> FrozenModels:
    """Load vae/, text_encoder/ and tokenizer/ (kind sdxl: also text_encoder_2/ and tokenizer_2/) from a
    folder or hub id (no download in tests)."""
    root = resolve_pretrained(pretrained)
    dtype = DTYPES[frozen_dtype]
    parts = "vae/text_encoder/tokenizer" + ("/text_encoder_2/tokenizer_2" if kind == "sdxl" else "")
    try:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        second = {}
        if kind == "sdxl":
            second = {"text_encoder_2": _freeze(CLIPTextModelWithProjection.from_pretrained(
                          root, subfolder="text_encoder_2", torch_dtype=dtype), device, dtype),
                      "tokenizer_2": AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2")}
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: cannot load {parts} from {root!r} "
                          f"({str(err).splitlines()[0][:160]})") from None
    scaling = float(vae.config.scaling_factor)
    return FrozenModels(_freeze(vae, device, dtype), _freeze(text_encoder, device, dtype), tokenizer,
                        scaling, dtype, **second)


def write_demo_text_encoder(root: Path, words: list[str], seed: int = 0, width: int = 64,
                            max_length: int = 16, second: bool = False, layers: int = 2,
                            heads: int = 4) -> None:
    """Write <root>/tokenizer (word level) and <root>/text_encoder (a small random, frozen CLIP text model);
    second: <root>/tokenizer_2 and <root>/text_encoder_2 instead, a CLIPTextModelWithProjection (SDXL's
    second encoder, whose projected end-of-text state is the pooled embedding).

    The demo's captions come from a closed vocabulary, so a word-level tokenizer is exact and needs
    no download; a frozen random transformer still maps each token and position to a distinct
    context vector, which is all the UNet's cross-attention needs to learn the prompts. width, layers,
    heads: the encoder's shapes (the benches write those of SD's and SDXL's encoders: same FLOPs).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)
    suffix = "_2" if second else ""
    tokenizer.save_pretrained(root / f"tokenizer{suffix}")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_length,
                            pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                            eos_token_id=vocab["<eos>"], **({"projection_dim": width} if second else {}))
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if second else CLIPTextModel)(config)
    model.save_pretrained(root / f"text_encoder{suffix}")
