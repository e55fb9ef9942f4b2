"""What the UNet is conditioned on: captions -> token ids (in the DataLoader workers) -> the UNet's
keyword arguments (on the device), with caption dropout for classifier-free guidance.

A kind of conditioning is one class with this interface; the loop, the objectives and the samplers
only see `tokenize`, `encode`, `encode_prompts` and `unconditional`, so a model family with other encoders
is a new class here, not a branch in the loop. Kinds: SD1.x/2.x (one CLIP encoder) and SDXL (two CLIP
encoders, a pooled embedding and size/crop micro-conditioning); `make_conditioning` picks by the frozen
models loaded (model.kind).
"""
from __future__ import annotations

import torch

from .config import ConfigError
from .models import FrozenModels


def make_conditioning(frozen: FrozenModels, caption_dropout: float = 0.0):
    """The conditioning kind of `frozen`: SDXL's when it has a second text encoder, else SD's."""
    if frozen.text_encoder_2 is not None:
        return SDXLConditioning(frozen, caption_dropout)
    return CLIPConditioning(frozen, caption_dropout)


def map_cond(fn, *conds):
    """fn applied leaf by leaf to conditioning kwargs of one layout (tensors, or dicts of them nested as the
    UNet's added_cond_kwargs are)."""
    if isinstance(conds[0], dict):
        return {key: map_cond(fn, *(c[key] for c in conds)) for key in conds[0]}
    return fn(*conds)


def _dropped(generator: torch.Generator | None, batch_size: int, p: float, device) -> torch.Tensor | None:
    """[B] bool: which captions a training step drops (one uniform draw per sample, from the step's
    generator); None without a generator (sampling)."""
    if generator is None:
        return None
    return torch.rand(batch_size, generator=generator, device=device) < p


class CLIPConditioning:
    """SD1.5: one CLIP text encoder; the context is its last hidden state [B, L, D], the UNet's
    `encoder_hidden_states`. A dropped caption gets the context of the empty prompt ""."""
    pooled_width = 0  # no added text embedding

    def __init__(self, frozen: FrozenModels, caption_dropout: float):
        self.frozen, self.caption_dropout = frozen, caption_dropout
        self.tokenize = frozen.tokenize  # [B] captions -> input_ids [B, L];
        # picklable for the loader's workers
        self.empty = frozen.encode_prompts(frozen.tokenize([""]))  # [1, L, D]: the dropped-caption context

    @property
    def width(self) -> int:
        """The context's last dimension: the UNet's cross_attention_dim."""
        return self.frozen.text_encoder.config.hidden_size

    def encode(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """A loader batch's input_ids [B, L] -> the UNet's conditioning kwargs.
        With a generator, each caption is dropped with probability caption_dropout."""
        context = self.frozen.encode_prompts(batch["input_ids"])
        drop = _dropped(generator, len(context), self.caption_dropout, context.device)
        if drop is not None:
            context = torch.where(drop[:, None, None], self.empty, context)
        return {"encoder_hidden_states": context}

    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict:
        """Prompts -> conditioning kwargs (no dropout): for sampling. `size` (width, height) px: unused."""
        return self.encode({"input_ids": self.tokenize(prompts)})

    def unconditional(self, batch_size: int, size: tuple[int, int] | None = None) -> dict:
        """The dropped-caption conditioning for `batch_size` samples
        (contiguous: the strides of a real batch)."""
        return {"encoder_hidden_states": self.empty.expand(batch_size, -1, -1).contiguous()}


class TokenizerPair:
    """SDXL's two tokenizers as one: [B] captions -> input_ids [B, 2, L] (a plain object: picklable for the
    loader's workers, and one tensor through the stream and the latent cache)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = [t(captions, padding="max_length", max_length=t.model_max_length, truncation=True,
                 return_tensors="pt").input_ids for t in (self.first, self.second)]
        return torch.stack(ids, dim=1)


class SDXLConditioning:
    """SDXL (Podell et al. 2023): two frozen CLIP text encoders and micro-conditioning.

    context [B, L, D1 + D2]: both encoders' penultimate hidden states, concatenated along the width (768 +
    1280 = 2048 for SDXL); pooled [B, P]: the second encoder's projected end-of-text state (1280), the
    UNet's `text_embeds`; time_ids [B, 6]: (original height, width, crop top, left, target height, width)
    in px per sample, from the data path (section 2.2: the size before resizing and the crop taken, so the
    model learns not to draw cropped objects). A dropped caption zeros the context and the pooled embedding
    together, as SDXL was trained and as diffusers' pipeline samples (force_zeros_for_empty_prompt); its
    time ids stay."""

    def __init__(self, frozen: FrozenModels, caption_dropout: float):
        self.frozen, self.caption_dropout = frozen, caption_dropout
        first, second = frozen.tokenizer, frozen.tokenizer_2
        if first.model_max_length != second.model_max_length:
            raise ConfigError(f"model.pretrained: tokenizer and tokenizer_2 pad to {first.model_max_length} "
                              f"and {second.model_max_length} tokens; SDXL's pad both to one length")
        self.tokenize = TokenizerPair(first, second)
        self.width = frozen.text_encoder.config.hidden_size + frozen.text_encoder_2.config.hidden_size
        self.pooled_width = frozen.text_encoder_2.config.projection_dim

    @torch.no_grad()
    def _context_and_pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, 2, L] -> (context [B, L, D1 + D2], pooled [B, P]), fp32."""
        device = self.frozen.text_encoder.device
        ids = input_ids.to(device, non_blocking=True)
        first = self.frozen.text_encoder(ids[:, 0], output_hidden_states=True)
        second = self.frozen.text_encoder_2(ids[:, 1], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return context.float(), second.text_embeds.float()

    def _target_size(self, batch: dict) -> torch.Tensor:
        """[2] (height, width) px of the batch's images (all one size: one bucket per micro-batch)."""
        if "images" in batch:
            return torch.tensor(batch["images"].shape[-2:])
        return torch.tensor(batch["moments"].shape[-2:]) * self.frozen.downsample

    def encode(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """A loader batch (input_ids [B, 2, L], original_size [B, 2], crop_top_left [B, 2], images or
        moments) -> the UNet's conditioning kwargs. With a generator, each caption is dropped with
        probability caption_dropout."""
        context, pooled = self._context_and_pooled(batch["input_ids"])
        B = len(context)
        target = self._target_size(batch).expand(B, 2)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1)
        drop = _dropped(generator, B, self.caption_dropout, context.device)
        if drop is not None:
            context = torch.where(drop[:, None, None], 0.0, context)
            pooled = torch.where(drop[:, None], 0.0, pooled)
        return self._kwargs(context, pooled, time_ids)

    def _kwargs(self, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> dict:
        return {"encoder_hidden_states": context,
                "added_cond_kwargs": {"text_embeds": pooled,
                                      "time_ids": time_ids.to(context.device, torch.float32)}}

    def _sampling_time_ids(self, batch_size: int, size: tuple[int, int] | None) -> torch.Tensor:
        """[B, 6]: an uncropped image of `size` (width, height) px, as diffusers' pipeline asks by default."""
        if size is None:
            raise ValueError("size: SDXL's time ids need the sample's (width, height) in px")
        width, height = size
        return torch.tensor([[height, width, 0, 0, height, width]]).expand(batch_size, 6)

    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict:
        """Prompts -> conditioning kwargs (no dropout) for images of `size` (width, height) px: sampling."""
        context, pooled = self._context_and_pooled(self.tokenize(prompts))
        return self._kwargs(context, pooled, self._sampling_time_ids(len(prompts), size))

    def unconditional(self, batch_size: int, size: tuple[int, int] | None = None) -> dict:
        """The dropped-caption conditioning (zeros) for `batch_size` samples of `size` (width, height) px."""
        L = self.frozen.tokenizer.model_max_length
        device = self.frozen.text_encoder.device
        return self._kwargs(torch.zeros(batch_size, L, self.width, device=device),
                            torch.zeros(batch_size, self.pooled_width, device=device),
                            self._sampling_time_ids(batch_size, size))
