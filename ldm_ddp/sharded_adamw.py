"""train.shard_optimizer=on: AdamW with its work and moments split over the ranks (ZeRO stage 2, Rajbhandari
et al. 2020), in place of DDP.

Under DDP every rank all-reduces every gradient, then runs the same AdamW over all the weights. Here the
trained weights live in one flat fp32 buffer (each parameter a view into it, in its own memory format:
channels-last stays channels-last), cut into `world` equal slices, one per rank; the backward adds the
gradients into views of a second flat buffer (as DDP's gradient_as_bucket_view). After the backward each rank
- reduce-scatters the flat gradients: it receives the mean gradient of its own slice only (half an
  all-reduce's bytes; in bf16 with train.grad_reduce=bf16);
- takes the norms of its slice's pieces of parameters; one small all-reduce of the per-parameter squares gives
  every rank the global norm (the clip, the skip of a non-finite step) and the per-block metrics;
- runs fused AdamW over its slice alone: one flat tensor, 1/world of the optimizer's pass;
- all-gathers the updated slices into the flat weights (the all-reduce's other half).
The bytes on the wire are an all-reduce's; each rank saves (world - 1) / world of the optimizer's and the
norm's passes over the weights (8 ms and 1 ms a step for SD1.5 on an H200, docs/performance.md).

Against DDP the bits differ by the order of the sums only: the cross-rank sum of the gradients (the backend's
reduce-scatter against its all-reduce) and the norm (added per piece of a parameter): a bounded difference,
tests/test_sharded_adamw.py. A trained parameter without a gradient in a step counts as a zero gradient
(weight decay and the moments' decay apply), where torch's AdamW would skip it; every UNet parameter gets one.
Only the trained weights are broadcast from rank 0 at the start (DDP also broadcasts the frozen ones and the
buffers): the rest is the same on every rank by the seed, or loaded from the same files.

Checkpoints keep plain AdamW's format (`optim.<name>.<state>`): gather_state() (a collective: every rank calls
it before a save) all-gathers the moments, and rank 0 reads them per parameter through `state` until the next
step; load_state_dict takes this rank's slice. A sharded run resumes from an unsharded checkpoint, on another
world size, and the other way round (refused, with one line, where plain AdamW left parameters at different
step counts: one flat tensor has one).
"""
from __future__ import annotations

import torch

from . import dist
from .config import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")


def make_optimizer(module: torch.nn.Module, cfg):
    """Fused AdamW over the module's trained parameters (fused: it skips a non-finite step on the device,
    without a host sync, faults.optimizer_step); split over the ranks with train.shard_optimizer=on."""
    trained = [p for p in module.parameters() if p.requires_grad]
    hyper = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                 weight_decay=cfg.optim.weight_decay)
    if cfg.train.shard_optimizer == "on":
        optimizer = ShardedAdamW(trained, grad_reduce=cfg.train.grad_reduce, **hyper)
        if dist.is_main():
            total = sum(p.numel() for p in trained)
            print(f"train.shard_optimizer: each of {optimizer.world} ranks updates {optimizer.chunk:,} "
                  f"of the {total:,} trained weights", flush=True)
        return optimizer
    return torch.optim.AdamW(trained, fused=True, **hyper)


def _view(flat: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
    """`like`'s shape and strides over flat[offset:offset + like.numel()] (a dense layout: contiguous or
    channels-last)."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


class ShardedAdamW:
    """Fused AdamW over this rank's slice of the flat weights; the optimizer interface the loop, faults.py and
    checkpoint.py use (param_groups, defaults, step, zero_grad, state, load_state_dict).

    Memory per rank, in copies of the trained weights (fp32): the weights and the gradients (views into flat
    buffers, as DDP's gradient_as_bucket_view) and 3/world for this slice's gradient and moments: 2 + 3/world
    against DDP's 4. Rank 0 gathers the moments (2 more) for a save, freed at the next step."""

    def __init__(self, params: list[torch.nn.Parameter], grad_reduce: str = "fp32", **adamw):
        self.params = list(params)
        first = self.params[0]
        for p in self.params:
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"train.shard_optimizer: a parameter of shape {tuple(p.shape)} and strides "
                                 f"{p.stride()} is neither contiguous nor channels-last")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"train.shard_optimizer: the trained parameters mix {first.dtype} on "
                                 f"{first.device} and {p.dtype} on {p.device}; they share one flat buffer")
        self.world, self.in_bf16 = dist.world_size(), grad_reduce == "bf16"
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.chunk = -(-total // self.world)  # the last slice is padded with zeros that never change
        self.flat = torch.zeros(self.chunk * self.world, dtype=first.dtype, device=first.device)
        for p, offset in zip(self.params, self.offsets):
            view = _view(self.flat, p, offset)
            view.copy_(p.detach())
            p.data = view  # the parameter object stays (the EMA, the compiled graph and the loop hold it)
        dist.broadcast_(self.flat)  # rank 0's weights everywhere, as DDP's wrap does
        # The gradients accumulate in place into views of one flat buffer, the reduce-scatter's input.
        self.flat_grad = torch.zeros_like(self.flat)
        self.grads = [_view(self.flat_grad, p, o) for p, o in zip(self.params, self.offsets)]
        self.detached = list(range(len(self.params)))  # parameters whose .grad is not their view (yet)
        self.zero_grad()
        lo = dist.rank() * self.chunk
        self.shard = torch.nn.Parameter(self.flat[lo:lo + self.chunk], requires_grad=False)
        self.shard.grad = torch.zeros_like(self.shard)
        # The pieces of parameters this rank's slice holds: (parameter index, start, end) within the slice.
        self.pieces = [(i, max(o, lo) - lo, min(o + p.numel(), lo + self.chunk) - lo)
                       for i, (p, o) in enumerate(zip(self.params, self.offsets))
                       if o < lo + self.chunk and o + p.numel() > lo]
        self.piece_index = torch.tensor([i for i, _, _ in self.pieces], dtype=torch.long, device=first.device)
        self.inner = torch.optim.AdamW([self.shard], fused=True, **adamw)
        self.defaults = self.inner.defaults
        hyper = {k: v for k, v in self.inner.param_groups[0].items() if k != "params"}
        self.param_groups = [{**hyper, "params": self.params}]  # the loop sets "lr" here; step() passes it on
        self.grad_scale = self.found_inf = None  # faults.optimizer_step sets both before each step()
        self.steps = self._gathered_at = 0
        self._state: dict = {}

    def reduce_gradients(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reduce-scatter this step's gradients; -> (the global norm of the mean gradients, the per-parameter
        norms in parameter order), as speed.grad_norms gives them under DDP; on the device, no host sync."""
        for i, (p, g) in enumerate(zip(self.params, self.grads)):  # a gradient set to None or replaced
            if p.grad is None:
                g.zero_()
            elif p.grad.data_ptr() != g.data_ptr():
                g.copy_(p.grad)
            else:
                continue
            self.detached.append(i)
        dist.reduce_scatter_mean(self.shard.grad, self.flat_grad, self.in_bf16)
        squares = torch.zeros(len(self.params), dtype=torch.float32, device=self.flat.device)
        if self.pieces:
            norms = torch._foreach_norm([self.shard.grad[a:b] for _, a, b in self.pieces])
            squares.index_add_(0, self.piece_index, torch.stack(norms).square())
        norms = dist.all_reduce_sum(squares).sqrt()
        return torch.linalg.vector_norm(norms), list(norms.unbind())

    def step(self) -> None:
        """AdamW on this rank's slice (the clip's divisor and the skip as grad_scale and found_inf), then
        every rank's updated slice everywhere."""
        self._state = {}  # a save's gathered moments go (their memory serves the next step)
        group = self.inner.param_groups[0]
        group.update({k: v for k, v in self.param_groups[0].items() if k != "params"})
        self.inner.grad_scale, self.inner.found_inf = self.grad_scale, self.found_inf
        self.inner.step()
        dist.all_gather_into(self.flat, self.shard)
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients, each parameter's .grad a view into them (never None: `set_to_none` is
        accepted for the interface)."""
        self.flat_grad.zero_()
        for i in self.detached:
            self.params[i].grad = self.grads[i]
        self.detached = []

    def gather_state(self, shapes_only: bool = False) -> None:
        """Every rank's slice of the moments, gathered for rank 0 to save and read through `state` until the
        next step (a collective; `state` is empty on the other ranks). shapes_only: no collective; `state`
        holds tensors of the moments' shapes on the meta device (what a saver needs for its buffers)."""
        mine = self.inner.state.get(self.shard, {})
        self._state, self._gathered_at = {}, self.steps
        if not mine:
            return
        if shapes_only:
            self._state = {p: {"step": mine["step"], **{k: torch.empty_like(p, device="meta")
                                                        for k in MOMENTS}} for p in self.params}
            return
        full = {key: torch.empty_like(self.flat) for key in MOMENTS}
        for key in MOMENTS:
            dist.all_gather_into(full[key], mine[key])
        if dist.is_main():
            self._state = {p: {"step": mine["step"], **{k: _view(full[k], p, o) for k in MOMENTS}}
                           for p, o in zip(self.params, self.offsets)}

    @property
    def state(self) -> dict:
        """{parameter: {"step", "exp_avg", "exp_avg_sq"}}, as torch's AdamW holds it; from gather_state()."""
        if self._gathered_at != self.steps:
            raise RuntimeError("ShardedAdamW.state: the moments were not gathered since the last step "
                               "(gather_state() on every rank before a save)")
        return self._state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's optimizer state dict over `params` (state keyed by their position): hyperparameters, and
        this rank's slice of the moments, cut parameter by parameter (no full-size buffer)."""
        (group,) = state_dict["param_groups"]
        hyper = {k: v for k, v in group.items() if k != "params"}
        self.param_groups[0].update(hyper)
        self.inner.param_groups[0].update(hyper)
        saved = [state_dict["state"].get(index) for index in group["params"]]
        if not any(saved):
            return
        steps = {float(s["step"]) if s else None for s in saved}
        if len(steps) > 1:  # one flat tensor has one step count
            raise ConfigError(f"train.shard_optimizer=on: the checkpoint's AdamW counts differ between "
                              f"parameters ({sorted(steps, key=str)}; a parameter without a gradient was not "
                              "stepped); resume it with train.shard_optimizer=off")
        lo = dist.rank() * self.chunk
        mine = {key: torch.zeros_like(self.shard) for key in MOMENTS}
        for (i, a, b), state in ((piece, saved[piece[0]]) for piece in self.pieces):
            p, start = self.params[i], lo + a - self.offsets[i]  # the piece's first element within p
            for key in MOMENTS:
                laid_out = torch.empty(p.numel(), dtype=p.dtype, device=p.device)  # p's memory order
                _view(laid_out, p, 0).copy_(state[key])
                mine[key][a:b] = laid_out[start:start + b - a]
        mine["step"] = saved[0]["step"].clone()  # fused AdamW counts it in place
        self.inner.load_state_dict({"state": {0: mine}, "param_groups": [{**hyper, "params": [0]}]})
        self._gathered_at = -1
