"""Everything torch.distributed, in one place (edm2's torch_utils/distributed.py in spirit).

Works without a launcher: with no RANK/WORLD_SIZE in the environment it is one process,
and every collective below is a no-op, so tests and one-GPU runs need no torchrun.
Collectives must be called on every rank; `is_main()` guards only printing and files.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

_device = torch.device("cpu")


def init(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join the process group if launched by torchrun (NCCL on GPU, gloo on CPU); -> this rank's device."""
    global _device
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        _device = torch.device("cuda", local_rank)
    else:
        _device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=_device if use_cuda else None)
    return _device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


def wrap_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrap for training when there is more than one rank; the module itself otherwise."""
    if not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [_device.index] if _device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)
