"""The GPU fast path's switches: the SDPA backend, torch.compile of the UNet (whole or by block), and a
probe at start that makes a failing switch say so before the first step, falling back only when asked.

Compilation is lazy in torch: a missing compiler or an unsupported kernel would otherwise surface inside
the first training step, or never clearly. The probe runs one forward and backward on a dummy batch,
with the run's autocast and attention backend, then drops its gradients: weights, optimizer and EMA are
untouched, and the step timings that follow exclude compilation.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .config import ConfigError

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
COMPILE_MODES = ("off", "full", "regional")


def attention(backend: str):
    """A fresh context selecting the SDPA kernel for one forward ("auto": PyTorch's own choice)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kernels[backend]])


def unet_blocks(unet) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def compile_model(unet, model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """-> the module the step calls. "full": torch.compile of the (DDP-wrapped) model, whose graph DDP's
    optimizer splits at bucket boundaries so communication still overlaps the backward; "regional": each
    down/mid/up block compiled in place (nn.Module.compile keeps parameter names, so checkpoints and the
    sampling copy are unaffected), which compiles in a fraction of the time since blocks of one class
    share code. "off": the model as it is."""
    if mode == "full":
        return torch.compile(model)
    if mode == "regional":
        for block in unet_blocks(unet):
            block.compile()
    return model


def uncompile(unet, model: torch.nn.Module) -> torch.nn.Module:
    """Undo compile_model: the eager module (for a fallback)."""
    for block in unet_blocks(unet):
        block._compiled_call_impl = None  # what nn.Module.compile sets
    return getattr(model, "_orig_mod", model)


def probe(step: Callable[[], None], what: str, fallback: bool, undo: Callable[[], None]) -> bool:
    """Run `step` once; -> True if it worked. On failure: ConfigError (one line), or with `fallback` a
    warning, `undo()`, and False."""
    try:
        step()
        return True
    except Exception as err:  # a compiler error, a missing kernel: any of them means the switch does not work
        message = f"{what} failed at start ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        if not fallback:
            raise ConfigError(f"{message}; set train.fallback=true to continue without it") from None
        print(f"warning: {message}; continuing without it (train.fallback=true)", flush=True)
        undo()
        return False
