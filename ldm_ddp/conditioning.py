"""What the UNet is conditioned on: captions -> token ids (in the DataLoader workers) -> the UNet's
keyword arguments (on the device), with caption dropout for classifier-free guidance.

A kind of conditioning is one class with this interface; the loop, the objectives and the samplers
only see `tokenize`, `encode` and `unconditional`, so a model family with other encoders (SDXL's two
CLIP encoders, pooled embedding and size/crop time ids) is a new class here, not a branch in the loop.
"""
from __future__ import annotations

import torch

from .models import FrozenModels


class CLIPConditioning:
    """SD1.5: one CLIP text encoder; the context is its last hidden state [B, L, D], the UNet's
    `encoder_hidden_states`. A dropped caption gets the context of the empty prompt ""."""

    def __init__(self, frozen: FrozenModels, caption_dropout: float):
        self.frozen, self.caption_dropout = frozen, caption_dropout
        self.tokenize = frozen.tokenize  # [B] captions -> input_ids [B, L];
        # picklable for the loader's workers
        self.empty = frozen.encode_prompts(frozen.tokenize([""]))  # [1, L, D]: the dropped-caption context

    @property
    def width(self) -> int:
        """The context's last dimension: the UNet's cross_attention_dim."""
        return self.frozen.text_encoder.config.hidden_size

    def encode(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A loader batch's input_ids [B, L] -> the UNet's conditioning kwargs.
        With a generator, each caption is dropped with probability caption_dropout (one uniform draw per
        sample, from the step's generator)."""
        context = self.frozen.encode_prompts(batch["input_ids"])
        if generator is not None:
            drop = torch.rand(len(context), generator=generator, device=context.device) < self.caption_dropout
            context = torch.where(drop[:, None, None], self.empty, context)
        return {"encoder_hidden_states": context}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> conditioning kwargs (no dropout): for sampling."""
        return self.encode({"input_ids": self.tokenize(prompts)})

    def unconditional(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The dropped-caption conditioning for `batch_size` samples
        (contiguous: the strides of a real batch)."""
        return {"encoder_hidden_states": self.empty.expand(batch_size, -1, -1).contiguous()}
