"""train.grad_reduce=bf16 (dist.reduce_in_bf16): DDP's gradient mean exchanged in bf16 and summed in fp32, on
gloo processes on CPU: the same bits on every rank, the formula's bits exactly, and within the bound of its
roundings of the fp32 all-reduce."""
import copy
import json

import pytest
import torch
from conftest import on_gloo_ranks

from ldm_ddp import dist
from ldm_ddp.checkpoint import load_checkpoint

WORLD = 3  # a bucket's length is rarely a multiple of it: the slices are padded


def _ranks_gradients(rank: int) -> dict:
    """One rank: the gradients of one backward under DDP with each grad_reduce, and without DDP (local)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.GELU(), torch.nn.Linear(53, 11))
    x = torch.randn(8, 37, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)
    grads = {}
    for reduce in ("fp32", "bf16"):
        ddp = dist.wrap_ddp(copy.deepcopy(model), bucket_cap_mb=0.004, grad_reduce=reduce)  # 3 buckets
        ddp(x).square().sum().backward()
        grads[reduce] = [p.grad.clone() for p in ddp.module.parameters()]
        del ddp  # DDP's reducer goes while its process group lives (freed after it, it can hang)
    local = copy.deepcopy(model)
    local(x).square().sum().backward()
    grads["local"] = [p.grad.clone() for p in local.parameters()]
    return grads


@pytest.mark.slow
def test_bf16_reduce_gives_every_rank_the_fp32_sum_of_bf16_gradients(tmp_path):
    ranks = on_gloo_ranks(_ranks_gradients, WORLD, tmp_path)
    for i in range(len(ranks[0]["local"])):
        local = torch.stack([r["local"][i] for r in ranks])
        mean = local.mean(0)
        torch.testing.assert_close(ranks[0]["fp32"][i], mean, rtol=1e-5, atol=1e-6)  # DDP's own
        reduced = ranks[0]["bf16"][i]
        assert all(torch.equal(r["bf16"][i], reduced) for r in ranks)  # the same bits everywhere
        formula = (local.to(torch.bfloat16).float().sum(0) / WORLD).to(torch.bfloat16).float()
        assert torch.equal(reduced, formula)
        # two roundings to bf16 (2^-8 relative each: 8 significant bits): the inputs', and the mean's
        bound = 2.0 ** -8 * (local.abs().mean(0) + mean.abs()) * 1.01 + 1e-12
        assert ((reduced - mean).abs() <= bound).all()
        assert not torch.equal(reduced, ranks[0]["fp32"][i])  # the hook ran: bf16 bits, not fp32's


@pytest.mark.slow
def test_the_trainer_reduces_in_bf16_under_torchrun(tmp_path, tiny_args, run_script):
    """train.grad_reduce=bf16 in a 2-rank run: it trains as the fp32 all-reduce does, up to the roundings (the
    first loss exactly, from the same initial weights; after three AdamW steps nearly all weights within 1%,
    none bit-identical to the fp32 run's where the hook did not run)."""
    runs = {}
    for reduce in ("fp32", "bf16"):
        out = tmp_path / reduce
        result = run_script("scripts/train.py", *tiny_args(out, train__max_steps=3, ckpt__every=3),
                            f"--train.grad_reduce={reduce}", nproc=2, timeout=150)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open() if '"loss"' in line]
        runs[reduce] = losses, load_checkpoint(out / "checkpoints" / "step_0000003.safetensors")[0]
    (losses, weights), (reference_losses, reference) = runs["bf16"], runs["fp32"]
    assert losses[0] == reference_losses[0] and losses == pytest.approx(reference_losses, rel=1e-2)
    unet = [k for k in reference if k.startswith("unet.")]
    assert any(not torch.equal(weights[k], reference[k]) for k in unet)
    close = sum(int(torch.isclose(weights[k], reference[k], rtol=1e-2, atol=1e-4).sum()) for k in unet)
    assert close >= 0.99 * sum(reference[k].numel() for k in unet)
