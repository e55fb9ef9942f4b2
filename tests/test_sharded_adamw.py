"""train.shard_optimizer=on (sharded_adamw.ShardedAdamW): AdamW split over the ranks in place of DDP, against
DDP with torch's fused AdamW: one process, gloo processes on CPU, and the trainer under torchrun."""
import copy
import json
import shutil

import pytest
import torch
from conftest import on_gloo_ranks

from ldm_ddp import dist, faults, speed
from ldm_ddp.checkpoint import load_checkpoint, load_optimizer_tensors, optimizer_tensors
from ldm_ddp.sharded_adamw import ShardedAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


def _model() -> torch.nn.Module:
    """Channels-last convolutions (as the UNet trains on a GPU) and linears of lengths no world divides."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.SiLU(), torch.nn.Conv2d(7, 5, 3),
                                torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 11), torch.nn.SiLU(),
                                torch.nn.Linear(11, 3))
    return model.to(memory_format=torch.channels_last)


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1000 * step + rank)) * (rank + 1)


def _train(model, optimizer, steps: range, rank: int = 0, clip: float = 0.1) -> list[float]:
    """The loop's step: backward, norms (reduce-scattered first when sharded), clip inside fused AdamW."""
    norms = []
    for step in steps:
        model(_batch(step, rank)).square().mean().backward()
        total, _ = speed.grad_norms(getattr(model, "module", model), optimizer)
        faults.optimizer_step(optimizer, torch.isfinite(total), speed.clip_divisor(total, clip))
        optimizer.zero_grad(set_to_none=True)
        norms.append(float(total))
    return norms


def _names(model) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def test_one_process_matches_fused_adamw_and_keeps_its_checkpoint_format():
    plain, sharded = _model(), _model()
    reference = torch.optim.AdamW(plain.parameters(), fused=True, **HYPER)
    optimizer = ShardedAdamW(list(sharded.parameters()), **HYPER)
    assert sharded[0].weight.is_contiguous(memory_format=torch.channels_last)  # the layout survives
    norms = _train(plain, reference, range(4))
    assert _train(sharded, optimizer, range(4)) == pytest.approx(norms, rel=1e-6)
    assert norms[0] > 0.1  # the clip acted
    for a, b in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="gather_state"):
        assert optimizer.state is not None
    optimizer.gather_state()
    saved, groups = optimizer_tensors(optimizer, _names(sharded))
    expected, expected_groups = optimizer_tensors(reference, _names(plain))
    assert saved.keys() == expected.keys() and groups == expected_groups
    for key, value in expected.items():
        assert saved[key].shape == value.shape
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-8)


def test_checkpoints_move_between_sharded_and_plain():
    """A sharded optimizer's saved state loads into torch's AdamW and back; both then step alike."""
    model = _model()
    optimizer = ShardedAdamW(list(model.parameters()), **HYPER)
    _train(model, optimizer, range(3))
    optimizer.gather_state()
    tensors, groups = optimizer_tensors(optimizer, _names(model))
    tensors = {k: v.clone() for k, v in tensors.items()}
    plain = copy.deepcopy(model)
    reference = torch.optim.AdamW(plain.parameters(), fused=True, **HYPER)
    load_optimizer_tensors(reference, dict(plain.named_parameters()), tensors, groups)
    again = _model()
    again.load_state_dict(model.state_dict())
    resharded = ShardedAdamW(list(again.parameters()), **HYPER)
    load_optimizer_tensors(resharded, dict(again.named_parameters()), tensors, groups)
    resharded.gather_state()
    for key, value in optimizer_tensors(resharded, _names(again))[0].items():
        assert torch.equal(value, tensors[key])
    _train(plain, reference, range(3, 5))
    _train(again, resharded, range(3, 5))
    for a, b in zip(plain.parameters(), again.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_gradients_set_aside_by_others_are_taken_as_they_are():
    """The gradients accumulate into views of the flat buffer; a .grad set to None after a backward (as the
    compile probe does) or replaced leaves nothing stale behind: the same steps as torch's AdamW."""
    plain, sharded = _model(), _model()
    reference = torch.optim.AdamW(plain.parameters(), fused=True, **HYPER)
    optimizer = ShardedAdamW(list(sharded.parameters()), **HYPER)
    assert sharded[0].weight.grad.data_ptr() == optimizer.grads[0].data_ptr()
    for model in (plain, sharded):  # a probe's backward, dropped
        model(_batch(99, 0)).square().mean().backward()
        model.zero_grad(set_to_none=True)
    _train(plain, reference, range(2))
    _train(sharded, optimizer, range(2))
    sharded[4].weight.grad = torch.ones_like(sharded[4].weight)  # replaced: taken, then added to
    plain[4].weight.grad = torch.ones_like(plain[4].weight)
    _train(plain, reference, range(2, 3))
    _train(sharded, optimizer, range(2, 3))
    for a, b in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_parameter_without_gradient_counts_as_zero_and_the_metrics_take_it(tmp_path):
    from ldm_ddp.metrics import Metrics
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
    optimizer = ShardedAdamW(list(model.parameters()), **HYPER)
    model["used"](torch.randn(2, 4)).sum().backward()
    model["unused"].weight.grad = None
    total, norms = speed.grad_norms(model, optimizer)
    assert len(norms) == 4 and float(norms[2]) == 0.0 and float(total) > 0
    metrics = Metrics(tmp_path, torch.device("cpu"), 1000, 10, 2, "lines")
    metrics.add_grad_norms(model, norms)
    assert float(metrics.step_groups.square().sum().sqrt()) == pytest.approx(float(total), rel=1e-6)


def test_a_checkpoint_with_uneven_step_counts_is_refused_with_one_line():
    from ldm_ddp.config import ConfigError
    model = _model()
    reference = torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    _train(model, reference, range(2))
    model(_batch(2, 0)).square().mean().backward()
    model[6].bias.grad = None  # this one is not stepped
    reference.step()
    tensors, groups = optimizer_tensors(reference, _names(model))
    optimizer = ShardedAdamW(list(model.parameters()), **HYPER)
    with pytest.raises(ConfigError, match="counts differ between parameters.*train.shard_optimizer=off"):
        load_optimizer_tensors(optimizer, dict(model.named_parameters()), tensors, groups)


def test_a_non_finite_gradient_skips_the_step():
    model = _model()
    optimizer = ShardedAdamW(list(model.parameters()), **HYPER)
    _train(model, optimizer, range(2))
    before = [p.detach().clone() for p in model.parameters()]
    model(_batch(2, 0)).square().mean().backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    total, _ = speed.grad_norms(model, optimizer)
    assert not torch.isfinite(total)
    faults.optimizer_step(optimizer, torch.isfinite(total), speed.clip_divisor(total, 0.1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


WORLD = 3  # the flat weights' length is no multiple of it: the last slice is padded


def _ranks_train(rank: int) -> dict:
    """One rank: four clipped steps under DDP with torch's fused AdamW, then sharded in fp32 and in bf16, each
    on its own copy of the same model and rank's data."""
    runs = {}
    ddp = dist.wrap_ddp(_model())
    reference = torch.optim.AdamW(ddp.module.parameters(), fused=True, **HYPER)
    norms = _train(ddp, reference, range(4), rank)
    saved, groups = optimizer_tensors(reference, _names(ddp.module))
    runs["ddp"] = norms, [p.detach().clone() for p in ddp.module.parameters()], \
        {k: v.clone() for k, v in saved.items()}
    del ddp  # DDP's reducer goes while its process group lives
    model = _model()  # DDP's moments loaded into a sharded optimizer: each rank takes its slice
    loaded = ShardedAdamW(list(model.parameters()), **HYPER)
    load_optimizer_tensors(loaded, dict(model.named_parameters()), runs["ddp"][2], groups)
    loaded.gather_state()
    runs["loaded"] = {k: v.clone() for k, v in optimizer_tensors(loaded, _names(model))[0].items()}
    for reduce in ("fp32", "bf16"):
        model = _model()
        optimizer = ShardedAdamW(list(model.parameters()), grad_reduce=reduce, **HYPER)
        norms = _train(model, optimizer, range(4), rank)
        optimizer.gather_state()
        runs[reduce] = norms, [p.detach().clone() for p in model.parameters()], \
            {k: v.clone() for k, v in optimizer_tensors(optimizer, _names(model))[0].items()}
    return runs


@pytest.mark.slow
def test_sharded_over_gloo_ranks_trains_as_ddp_does(tmp_path):
    ranks = on_gloo_ranks(_ranks_train, WORLD, tmp_path)
    norms, weights, moments = ranks[0]["ddp"]
    assert ranks[0]["loaded"].keys() == moments.keys()
    assert all(torch.equal(ranks[0]["loaded"][k], v) for k, v in moments.items())  # gathered back exactly
    assert norms[0] > 0.1  # the clip acted
    for reduce, tolerance in (("fp32", dict(rtol=1e-5, atol=1e-6)), ("bf16", dict(rtol=2e-2, atol=1e-4))):
        for r in ranks[1:]:  # every rank ends with the same bits; the gathered moments are rank 0's to save
            assert r[reduce][0] == ranks[0][reduce][0]
            assert all(torch.equal(a, b) for a, b in zip(r[reduce][1], ranks[0][reduce][1]))
            assert r[reduce][2] == {}
        got_norms, got_weights, got_moments = ranks[0][reduce]
        assert got_norms == pytest.approx(norms, rel=tolerance["rtol"])
        for a, b in zip(got_weights, weights):
            torch.testing.assert_close(a, b, **tolerance)
        assert got_moments.keys() == moments.keys()
        for k, v in moments.items():
            torch.testing.assert_close(got_moments[k], v, rtol=tolerance["rtol"] * 10, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["bf16"][1], weights))  # bf16 bits did differ


ACCUMULATING = dict(train__max_steps=4, ckpt__every=2, train__global_batch=8)  # 2 ranks, 2 micro-batches of 2


def _checkpoint(out, step: int) -> dict:
    return load_checkpoint(out / "checkpoints" / f"step_{step:07d}.safetensors")[0]


@pytest.mark.slow
def test_the_trainer_shards_under_torchrun_and_resumes_exactly(tmp_path, tiny_args, run_script):
    """train.shard_optimizer=on in a 2-rank run accumulating 2 micro-batches a step: it trains as DDP does
    (the first loss exactly, the weights after four steps within the sums' roundings), saves the usual
    format, and a run resumed from its step-2 save ends with the bits of the run that never stopped."""
    runs = {}
    for shard in ("on", "off"):
        out = tmp_path / shard
        result = run_script("scripts/train.py", *tiny_args(out, **ACCUMULATING),
                            f"--train.shard_optimizer={shard}", nproc=2, timeout=150)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert ("train.shard_optimizer: each of 2 ranks updates" in result.stdout) == (shard == "on")
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open() if '"loss"' in line]
        runs[shard] = losses, _checkpoint(out, 4)
    (losses, state), (reference_losses, reference) = runs["on"], runs["off"]
    assert losses[0] == reference_losses[0] and losses == pytest.approx(reference_losses, rel=1e-4)
    assert state.keys() == reference.keys()  # weights, EMA and every parameter's moments, by name
    for k, v in reference.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "on", resumed)
    (resumed / "checkpoints" / "step_0000004.safetensors").unlink()
    (resumed / "metrics.jsonl").unlink()
    result = run_script("scripts/train.py", *tiny_args(resumed, **ACCUMULATING), "--train.shard_optimizer=on",
                        nproc=2, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = _checkpoint(resumed, 4)
    assert all(torch.equal(again[k], v) for k, v in state.items())
