"""train.shard_optimizer=on: AdamW with its work and moments split over the ranks (ZeRO stage 2, Rajbhandari
et al. 2020), in place of DDP.

Under DDP every rank all-reduces every gradient, then runs the same AdamW over all the weights. Here the
trained weights live in one flat fp32 buffer (each parameter a view into it, in its own memory format:
channels-last stays channels-last), cut into `world` equal slices, one per rank. After the backward each rank
- copies its gradients into a flat buffer and reduce-scatters it: it receives the mean gradient of its own
  slice only (half an all-reduce's bytes; in bf16 with train.grad_reduce=bf16);
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

Checkpoints keep plain AdamW's format (`optim.<name>.<state>`): gather_state() (a collective: every rank calls
it before a save) all-gathers the moments into full-size buffers kept for the saves, and `state` then reads
them per parameter; load_state_dict takes this rank's slice. A sharded run resumes from an unsharded
checkpoint, on another world size, and the other way round.
"""
from __future__ import annotations

import torch

from . import dist

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
    checkpoint.py use (param_groups, defaults, step, zero_grad, state, load_state_dict)."""

    def __init__(self, params: list[torch.nn.Parameter], grad_reduce: str = "fp32", **adamw):
        self.params = list(params)
        for p in self.params:
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"train.shard_optimizer: a parameter of shape {tuple(p.shape)} and strides "
                                 f"{p.stride()} is neither contiguous nor channels-last")
        self.world, self.in_bf16 = dist.world_size(), grad_reduce == "bf16"
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.chunk = -(-total // self.world)  # the last slice is padded with zeros that never change
        first = self.params[0]
        self.flat = torch.zeros(self.chunk * self.world, dtype=first.dtype, device=first.device)
        for p, offset in zip(self.params, self.offsets):
            view = _view(self.flat, p, offset)
            view.copy_(p.detach())
            p.data = view  # the parameter object stays (the EMA, the compiled graph and the loop hold it)
        dist.broadcast_(self.flat)  # rank 0's weights everywhere, as DDP's wrap does
        self.send = torch.zeros_like(self.flat)  # the gradients, flat, on their way
        self.send_views = [_view(self.send, p, o) for p, o in zip(self.params, self.offsets)]
        lo = dist.rank() * self.chunk
        self.shard = torch.nn.Parameter(self.flat[lo:lo + self.chunk], requires_grad=False)
        self.shard.grad = torch.zeros_like(self.shard)
        # The pieces of parameters this rank's slice holds: (parameter index, start, end) within the slice.
        pieces = [(i, max(o, lo) - lo, min(o + p.numel(), lo + self.chunk) - lo)
                  for i, (p, o) in enumerate(zip(self.params, self.offsets))
                  if o < lo + self.chunk and o + p.numel() > lo]
        self.piece_slices = [(a, b) for _, a, b in pieces]
        self.piece_index = torch.tensor([i for i, _, _ in pieces], dtype=torch.long, device=first.device)
        self.inner = torch.optim.AdamW([self.shard], fused=True, **adamw)
        self.defaults = self.inner.defaults
        hyper = {k: v for k, v in self.inner.param_groups[0].items() if k != "params"}
        self.param_groups = [{**hyper, "params": self.params}]  # the loop sets "lr" here; step() passes it on
        self.grad_scale = self.found_inf = None  # faults.optimizer_step sets both before each step()
        self.steps = self._gathered_at = 0
        self._full: dict[str, torch.Tensor] = {}
        self._state: dict = {}

    def reduce_gradients(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Reduce-scatter this step's gradients; -> (the global norm of the mean gradients, the per-parameter
        norms in parameter order), as speed.grad_norms gives them under DDP; on the device, no host sync."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_copy_(self.send_views, grads)
        dist.reduce_scatter_mean(self.shard.grad, self.send, self.in_bf16)
        pieces = [self.shard.grad[a:b] for a, b in self.piece_slices]
        squares = torch.zeros(len(self.params), dtype=torch.float32, device=self.flat.device)
        if pieces:
            squares.index_add_(0, self.piece_index, torch.stack(torch._foreach_norm(pieces)).square())
        norms = dist.all_reduce_sum(squares).sqrt()
        return torch.linalg.vector_norm(norms), list(norms.unbind())

    def step(self) -> None:
        """AdamW on this rank's slice (the clip's divisor and the skip as grad_scale and found_inf), then
        every rank's updated slice everywhere."""
        group = self.inner.param_groups[0]
        group.update({k: v for k, v in self.param_groups[0].items() if k != "params"})
        self.inner.grad_scale, self.inner.found_inf = self.grad_scale, self.found_inf
        self.inner.step()
        dist.all_gather_into(self.flat, self.shard)
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def gather_state(self) -> None:
        """Every rank's slice of the moments into full-size buffers, read by `state` (a collective). Rank 0,
        which saves, keeps its buffers for the next save; the other ranks free theirs (`state` is empty
        there)."""
        mine = self.inner.state.get(self.shard, {})
        self._state = {}
        if mine:
            for key in MOMENTS:
                if key not in self._full:
                    self._full[key] = torch.empty_like(self.flat)
                dist.all_gather_into(self._full[key], mine[key])
            if dist.is_main():
                self._state = {p: {"step": mine["step"], **{k: _view(self._full[k], p, o) for k in MOMENTS}}
                               for p, o in zip(self.params, self.offsets)}
            else:
                self._full.clear()
        self._gathered_at = self.steps

    @property
    def state(self) -> dict:
        """{parameter: {"step", "exp_avg", "exp_avg_sq"}}, as torch's AdamW holds it; from gather_state()."""
        if self._gathered_at != self.steps:
            raise RuntimeError("ShardedAdamW.state: the moments were not gathered since the last step "
                               "(gather_state() on every rank before a save)")
        return self._state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's optimizer state dict over `params` (state keyed by their position): hyperparameters, and
        this rank's slice of the moments."""
        (group,) = state_dict["param_groups"]
        hyper = {k: v for k, v in group.items() if k != "params"}
        self.param_groups[0].update(hyper)
        self.inner.param_groups[0].update(hyper)
        saved = state_dict["state"]
        if not saved:
            return
        full = {key: torch.zeros_like(self.flat) for key in MOMENTS}
        for position, index in enumerate(group["params"]):
            p, offset = self.params[position], self.offsets[position]
            for key in MOMENTS:
                _view(full[key], p, offset).copy_(saved[index][key])
        step = saved[group["params"][0]]["step"].clone()  # fused AdamW counts it in place
        lo = dist.rank() * self.chunk
        mine = {"step": step, **{key: full[key][lo:lo + self.chunk].clone() for key in MOMENTS}}
        self.inner.load_state_dict({"state": {0: mine}, "param_groups": [{**hyper, "params": [0]}]})
        self._gathered_at = -1
