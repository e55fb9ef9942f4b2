"""The EMA update on CUDA in one pass: a Triton kernel over every weight and every profile at once.

The update is shadow += w * (weights - shadow), which the portable path (ema.EMA._apply) runs as three
multi-tensor passes with a temporary between them: about seven reads and writes of 3.4 GB for the SD1.5 UNet
(7.8 ms on an H200). Here each block of a weight tensor is read once, and every profile's shadow block is read
and written once: 10.3 GB for one profile, near the card's memory bandwidth.

Same bits as the portable path: the kernel rounds after the subtraction, the product and the sum, as the
three passes do (no fused multiply-add: `enable_fp_fusion=False`).

The kernel finds its tensors through a table on the device of their offsets from one base tensor's address
(in floats): one row for the weights, one per profile's shadows. Every address is a multiple of 16 bytes, as
the caching allocator gives each tensor, and Triton is told so: the blocks that lie inside their tensor load
and store 4 floats per instruction (on an H200, 32-bit accesses reached only ~3.4 TB/s). Each program updates
BLOCK consecutive elements of one tensor in memory order, which is the same element in the weight and the
shadow when both have the same strides and cover their memory densely (channels-last or not). The table is
rebuilt, and the layouts checked again, when a weight's address changes (the shadows, only ever written in
place, keep theirs; the trainer never changes a parameter's layout in place once the EMA is made).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: EMA uses the portable path
    triton = None

BLOCK = 8192  # elements a program updates (8192 and 16 warps: the fastest of those tried on an H200)
NUM_WARPS = 16

if triton is not None:
    @triton.jit
    def lerp_kernel(base, table, numels, block_tensor, block_start, weights, tensors,
                    PROFILES: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        """table: int64 offsets from `base` in floats, [1 + PROFILES, tensors] (weights, then each
        profile's shadows), each a multiple of 4; program i updates elements block_start[i] + [0, BLOCK) of
        tensor block_tensor[i]. MASKED: the blocks that end past their tensor's end (else none does, and
        the unmasked loads and stores move 4 floats at a time)."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.load(block_start + pid)
        inside = start + tl.arange(0, BLOCK) < tl.load(numels + t)
        current_at = base + tl.multiple_of(tl.load(table + t) + start, 4) + tl.arange(0, BLOCK)
        if MASKED:
            current = tl.load(current_at, mask=inside)
        else:
            current = tl.load(current_at)
        for p in tl.static_range(PROFILES):
            shadow_at = (base + tl.multiple_of(tl.load(table + (p + 1) * tensors + t) + start, 4)
                         + tl.arange(0, BLOCK))
            if MASKED:
                shadow = tl.load(shadow_at, mask=inside)
                tl.store(shadow_at, shadow + (current - shadow) * tl.load(weights + p), mask=inside)
            else:
                shadow = tl.load(shadow_at)
                tl.store(shadow_at, shadow + (current - shadow) * tl.load(weights + p))


def _dense(t: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its memory span exactly once, in any order of strides."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class OnePassUpdate:
    """The fused update of one EMA's shadows (a list per profile) toward a module's weights."""

    kernel = lerp_kernel if triton is not None else None  # tests swap in Triton's interpreter

    def __init__(self, shadows: list[list[torch.Tensor]]):
        self.shadows = shadows
        self.key = None  # the weights' addresses the table holds
        self.base = shadows[0][0]  # the table's offsets are from this tensor's address
        self.shadow_addresses = tuple(t.data_ptr() for shadow in shadows for t in shadow)  # fixed: in place
        self.block, self.num_warps = BLOCK, NUM_WARPS  # the block table is made for this BLOCK
        device = shadows[0][0].device
        sizes = [t.numel() for t in shadows[0]]
        blocks = [(i, start) for i, n in enumerate(sizes) for start in range(0, n, self.block)]
        blocks.sort(key=lambda b: b[1] + self.block > sizes[b[0]])  # the unmasked blocks first, then the rest
        self.unmasked = sum(start + self.block <= sizes[i] for i, start in blocks)
        self.numels = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.block_tensor = torch.tensor([i for i, _ in blocks], dtype=torch.int32, device=device)
        self.block_start = torch.tensor([s for _, s in blocks], dtype=torch.int64, device=device)

    def fits(self, current: list[torch.Tensor]) -> bool:
        """Whether the kernel can update toward these weights: fp32, each laid out as its shadows are,
        dense, and at an address that is a multiple of 16 bytes (as every shadow's). Checked, and the
        table rebuilt, when a weight's address changes."""
        key = tuple(t.data_ptr() for t in current)
        if key == self.key:
            return True
        layout = [c.stride() for c in current]
        addresses = key + self.shadow_addresses
        if not all(c.dtype == torch.float32 and _dense(c) for c in current) or any(
                [t.stride() for t in shadow] != layout for shadow in self.shadows) or any(
                a % 16 for a in addresses):
            return False
        self.key = key
        base = self.base.data_ptr()
        self.table = torch.tensor([(a - base) // 4 for a in addresses], dtype=torch.int64,
                                  device=current[0].device)
        return True

    def __call__(self, current: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        """shadow += weight * (current - shadow) for every profile's shadows (call fits() first): one launch
        for the blocks inside their tensors, one for the tensors' last partial blocks."""
        weight = torch.stack(weights).float()
        n = self.unmasked
        for masked, tensors, starts in ((False, self.block_tensor[:n], self.block_start[:n]),
                                        (True, self.block_tensor[n:], self.block_start[n:])):
            if len(tensors):
                self.kernel[(len(tensors),)](
                    self.base, self.table, self.numels, tensors, starts, weight, len(current),
                    PROFILES=len(self.shadows), BLOCK=self.block, MASKED=masked, num_warps=self.num_warps,
                    enable_fp_fusion=False)

    @torch.no_grad()
    def probe(self) -> None:
        """Compile and launch the kernel now, with a weight of 0 toward the shadows themselves (nothing
        changes): a GPU or a machine it cannot run on (no C compiler for Triton's launcher, a card older than
        it supports) raises here, before training starts, not at the first update."""
        current = self.shadows[0]
        if not self.fits(current):
            raise RuntimeError("the shadows do not fit the kernel")
        self(current, [torch.zeros((), device=current[0].device)] * len(self.shadows))
        if current[0].is_cuda:
            torch.cuda.synchronize(current[0].device)


def one_pass_for(shadows: list[list[torch.Tensor]]) -> OnePassUpdate | None:
    """The one-pass update of these CUDA shadows, probed; None (with a warning saying why) where Triton is
    missing or its kernel does not run: the EMA then takes the foreach passes."""
    from torch.utils._triton import has_triton
    if OnePassUpdate.kernel is None or not has_triton():
        return None
    update = OnePassUpdate(shadows)
    try:
        update.probe()
    except Exception as err:  # compiler, driver or launcher errors: Triton raises many kinds
        print(f"warning: the one-pass EMA update does not run here ({type(err).__name__}: "
              f"{str(err).splitlines()[0][:160] if str(err) else ''}); using the foreach passes")
        return None
    return update
