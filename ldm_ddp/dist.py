"""Everything torch.distributed, in one place (edm2's torch_utils/distributed.py in spirit).

Works without a launcher: with no RANK/WORLD_SIZE in the environment it is one process,
and every collective below is a no-op, so tests and one-GPU runs need no torchrun.
Collectives must be called on every rank; `is_main()` guards only printing and files.

Two process groups: the default one (NCCL on GPU, gloo on CPU) for DDP and tensor reductions, and a gloo
"control" group for the small host-side agreements made every step (preemption flag, save outcome): a
gloo all-reduce of a CPU tensor never waits for the GPU, so agreeing costs no device sync.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .config import ConfigError

_device = torch.device("cpu")
_control = None  # the gloo group of the host-side agreements (the default group itself on CPU)
_timeout_s = 0.0  # the collective timeout now in force


def init(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join the process group if launched by torchrun (NCCL on GPU, gloo on CPU); -> this rank's device."""
    global _device, _control, _timeout_s
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"this is local rank {local_rank} but the node has {torch.cuda.device_count()} "
                          "visible GPU(s): start at most that many processes per node "
                          "(torchrun --nproc_per_node), one per GPU")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        _device = torch.device("cuda", local_rank)
    else:
        _device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=_device if use_cuda else None)
        _control = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else dist.group.WORLD
        _timeout_s = timeout_s
    return _device


def set_timeout(timeout_s: float) -> None:
    """Collectives started from now on fail after `timeout_s` seconds (every group of this rank;
    a local call).

    gloo raises in the waiting call; NCCL's watchdog aborts the process. Either way a rank whose peer died or
    hangs stops within the timeout instead of waiting forever.
    """
    global _timeout_s
    if dist.is_initialized() and timeout_s != _timeout_s:
        for group in dict.fromkeys([dist.group.WORLD, _control]):  # one group on CPU, two on GPU
            dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
        _timeout_s = timeout_s


@contextlib.contextmanager
def timeout(timeout_s: float):
    """`set_timeout` for the duration of a block (e.g. a save, where ranks wait while rank 0 writes)."""
    before = _timeout_s
    set_timeout(timeout_s)
    try:
        yield
    finally:
        set_timeout(before)


def peer_failure(err: BaseException) -> str | None:
    """One line if `err` is a collective that failed because another rank died, hung or went away;
    else None."""
    text = " ".join(str(err).split())
    # gloo raises plain RuntimeErrors whose text starts with its source path;
    # the c10d errors have their own types.
    if not (isinstance(err, dist.DistError) or "/gloo/" in text):
        return None
    return (f"rank {rank()}: a collective failed ({text[:300]}); another rank died, hung or exited, or "
            f"waited more than the collective timeout ({_timeout_s:g} s). A restart resumes from the newest "
            "valid checkpoint.")


def shutdown() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def device() -> torch.device:
    return _device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place and returned (a sync point: call at log time only)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _reduce_ints(values: list[int], op) -> list[int]:
    """Element-wise `op` over ranks of a few host integers, on the gloo control group (no device sync)."""
    if not dist.is_initialized():
        return list(values)
    box = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(box, op=op, group=_control)
    return box.tolist()


def all_reduce_max_ints(values: list[int]) -> list[int]:
    return _reduce_ints(values, dist.ReduceOp.MAX)


def all_reduce_sum_ints(values: list[int]) -> list[int]:
    return _reduce_ints(values, dist.ReduceOp.SUM)


def all_gather_str(text: str) -> list[str]:
    """`text` from every rank, in rank order (UTF-8 bytes, padded to the longest, on the control group)."""
    if not dist.is_initialized():
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)]), group=_control)
    longest = max(1, *(int(n) for n in sizes))
    parts = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, torch.cat([data, torch.zeros(longest - len(data), dtype=torch.uint8)]),
                    group=_control)
    return [bytes(part[:int(n)].tolist()).decode() for part, n in zip(parts, sizes)]


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = torch.tensor([value], dtype=torch.int64, device=_device)
    dist.broadcast(box, src=0)
    return int(box.item())


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate same-shaped tensors from all ranks along dim 0, in rank order."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank, in place."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def reduce_scatter_mean(out: torch.Tensor, flat: torch.Tensor, in_bf16: bool = False) -> torch.Tensor:
    """This rank's slice of the mean over the ranks of `flat` (world x len(out) elements), into `out` (fp32).
    fp32: the backend's reduce-scatter of the sum, divided by the world size. in_bf16: each rank rounds
    `flat` to bf16 and sends every rank its slice (all-to-all: the reduce-scatter's bytes, halved); the
    slices are summed in fp32, in rank order, and divided (reduce_in_bf16's arithmetic, without its
    rounding of the mean)."""
    if not dist.is_initialized():
        return out.copy_(flat)
    world = dist.get_world_size()
    if in_bf16:
        send = flat.to(torch.bfloat16)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send)
        torch.sum(received.view(world, -1), 0, dtype=torch.float32, out=out)
    else:
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # < 2.12
        reduce_scatter(out, flat, op=dist.ReduceOp.SUM)
    return out.div_(world)


def all_gather_into(flat: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Every rank's `part` (same length), concatenated in rank order into `flat`; `part` may be this rank's
    own slice of `flat` (in place)."""
    if not dist.is_initialized():
        return flat if part.data_ptr() == flat.data_ptr() else flat.copy_(part)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12
    all_gather(flat, part)
    return flat


def wrap_ddp(module: torch.nn.Module, static_graph: bool = False, bucket_cap_mb: float = 25.0,
             grad_reduce: str = "fp32") -> torch.nn.Module:
    """DDP-wrap for training when there is more than one rank; the module itself otherwise. Gradients are
    views into the all-reduce buckets (no copy); `static_graph` and `bucket_cap_mb` are DDP's own.
    `grad_reduce` (train.grad_reduce): fp32, DDP's own all-reduce; bf16, reduce_in_bf16."""
    if not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [_device.index] if _device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True,
                                  static_graph=static_graph, bucket_cap_mb=bucket_cap_mb)
    if grad_reduce == "bf16":
        ddp.register_comm_hook(None, reduce_in_bf16)
    return ddp


def reduce_in_bf16(group, bucket):  # no annotation: DDP checks it, and this module's are strings
    """DDP's communication hook for train.grad_reduce=bf16: a bucket's mean over the ranks in half the bytes
    of the fp32 all-reduce, added up in fp32. Each rank rounds its gradients to bf16 and sends every rank its
    1/world slice (all-to-all); each rank sums its slice over the ranks in fp32, divides by the world size
    and rounds to bf16; the slices are then all-gathered in bf16. Every rank ends with the same bits:
    bf16(sum over ranks of bf16(grad), in fp32, / world), within two bf16 roundings (2^-8 each) of the fp32
    mean (tests/test_dist_hooks.py). The gather is chained on the exchange's future, so under eager DDP the
    backward goes on while a bucket is on its way."""
    group = group or dist.group.WORLD
    world, flat = dist.get_world_size(group), bucket.buffer()
    n = flat.numel()
    chunk = -(-n // world)
    send = torch.zeros(world * chunk, dtype=torch.bfloat16, device=flat.device)
    send[:n].copy_(flat)
    received = torch.empty_like(send)
    exchanged = dist.all_to_all_single(received, send, group=group, async_op=True).get_future()

    def gather(_) -> torch.Tensor:
        mine = received.view(world, chunk).float().sum(0).div_(world).to(torch.bfloat16)
        gathered = torch.empty_like(send)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12
        all_gather(gathered, mine, group=group, async_op=True).wait()
        return flat.copy_(gathered[:n])

    return exchanged.then(gather)


def accumulating(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's backward: DDP's no_sync (gradients kept local, not all-reduced) unless
    `sync` (the last micro-batch of a step); nothing to do for a model that is not DDP-wrapped."""
    from torch.nn.parallel import DistributedDataParallel
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    return contextlib.nullcontext() if sync or not isinstance(ddp, DistributedDataParallel) else ddp.no_sync()


def torchrun(argv: list[str]) -> None:
    """torch.distributed.run's command line (torchrun) in this process: returns when every rank succeeded,
    raises when one failed (ChildFailedError) or torchrun was signalled (SignalException)."""
    from torch.distributed import run
    run.main(argv)
