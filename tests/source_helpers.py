"""Helpers shared by the data-source tests: tiny images, a picklable tokenizer, and a stream runner."""

import io
import itertools

import torch
from PIL import Image

from ldm_ddp.data.stream import ShardedStream, make_loader
from ldm_ddp.data.transforms import ImageTransform

R = 8  # px: the tests' training resolution


def png(width: int, height: int = 9) -> bytes:
    """PNG bytes of a flat image whose colour depends on its width."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (width * 7 % 256, 90, 30)).save(out, format="PNG")
    return out.getvalue()


def tokenize(captions: list[str]) -> torch.Tensor:
    """[B] captions -> [B, 1] caption lengths (picklable for workers)."""
    return torch.tensor([[len(c)] for c in captions])


def run(source, num_workers, world=1, batch=3, steps=5):
    """The first `steps` micro-batches of rank 0, then of rank 1, ...; random crop and flip on.

    Each batch also carries its "rank" and global "positions".
    """
    transform = ImageTransform(R, crop="random", random_flip=True)
    batches = []
    for rank in range(world):
        stream = ShardedStream(source, tokenize, R, batch, 1, rank, world, seed=0, transform=transform)
        loader = make_loader(stream, num_workers, prefetch_batches=2, pin_memory=False)
        batches += [{**b, "rank": rank, "positions": list(stream.positions(b["k"]))}
                    for b in itertools.islice(iter(loader), steps)]
    return batches
