"""dist.on_first_bucket, the DDP comm hook behind ema.overlap: it averages the gradients exactly as DDP's built-in
reducer does, at a world size that is not a power of two, and runs its work once per synced backward."""

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import free_port
from torch.nn.parallel import DistributedDataParallel


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from ldm_ddp import dist
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    grads, calls = {}, []
    for hooked in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        ddp = DistributedDataParallel(net, gradient_as_bucket_view=True, bucket_cap_mb=0.05)  # several buckets
        if hooked:
            dist.on_first_bucket(ddp, lambda: calls.append(1))
        for step in range(2):
            torch.manual_seed(100 * step + rank)  # each rank its own batch
            ddp(torch.randn(8, 64)).square().mean().backward()
            grads[hooked, step] = [p.grad.clone() for p in net.parameters()]
            net.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({"grads": grads, "calls": len(calls)}, out)
    torch_dist.destroy_process_group()


def test_the_hook_averages_like_ddp_itself_on_three_ranks(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_rank, args=(3, free_port(), str(out)), nprocs=3)
    result = torch.load(out)
    assert result["calls"] == 2  # the work ran once per backward
    for step in range(2):
        builtin, hooked = result["grads"][False, step], result["grads"][True, step]
        assert len(builtin) == 4 and all(torch.equal(a, b) for a, b in zip(builtin, hooked))
