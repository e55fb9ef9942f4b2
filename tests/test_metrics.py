"""Training signals in-process on a tiny UNet: grad norm per block group, FLOPs per image and MFU, skipped
steps, the console summary line, the divergence warning; TensorBoard scalars and images; wandb checkpoint
artifacts (offline)."""

import json
import math
import re
from collections import defaultdict

import pytest
import torch
from conftest import TINY_UNET
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from ldm_ddp.metrics import (
    CPU_SDPA_FLOPS,
    LossWatch,
    Metrics,
    append_jsonl,
    block_group,
    count_train_flops,
    start_tensorboard,
    start_wandb,
)
from ldm_ddp.sampling import make_grid

CPU = torch.device("cpu")


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(TINY_UNET).train()


def test_block_groups_of_the_unet():
    groups = list(dict.fromkeys(block_group(n) for n, _ in tiny_unet().named_parameters()))
    assert groups == ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "up_blocks.0",
                      "up_blocks.1",
                      "mid_block", "conv_norm_out", "conv_out"]


def test_grad_norms_per_block_group_mfu_and_the_summary_line(tmp_path, capsys):
    unet = tiny_unet()
    metrics = Metrics(tmp_path, CPU, 1000, 10, images_per_step=2, progress="lines", train_flops_per_image=2e9,
                      peak_tflops=0.5)
    expected = defaultdict(float)
    for step in range(2):
        x_t, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 64)
        loss_per_sample = unet(x_t, t, context).sample.square().mean(dim=(1, 2, 3))
        loss_per_sample.mean().backward()
        if step == 1:
            # a parameter without a gradient this step is left out, not an error
            unet.conv_out.bias.grad = None
        metrics.add_micro_batch(loss_per_sample.detach(), t)
        metrics.add_grad_norms(unet)
        squares = defaultdict(float)
        for name, p in unet.named_parameters():
            if p.grad is not None:
                squares[block_group(name)] += p.grad.double().square().sum().item()
        total = torch.nn.utils.clip_grad_norm_(unet.parameters(), float("inf"))
        # the groups partition the norm
        assert sum(squares.values()) == pytest.approx(total.item() ** 2, rel=1e-5)
        for group, sq in squares.items():  # step 0 is skipped: its norms are left out of the record's means
            expected[group] += math.sqrt(sq) if step == 1 else 0.0
        metrics.add_step(loss_per_sample.mean().detach(), total, data_wait_s=0.0, bad=[],
                         skipped=torch.tensor(step == 0))
        unet.zero_grad(set_to_none=True)
    record = metrics.flush(2, lr=1e-3)
    assert list(record["grad_norm_by_block"]) == list(expected)
    for group, value in record["grad_norm_by_block"].items():
        assert value == pytest.approx(expected[group], rel=1e-5), group
    assert record["skipped_steps"] == 1 and record["bad_samples"] == 0
    assert [v is None for v in record["loss_by_t"]] == [False] + [True] * 8 + [False]
    assert record["tflops_per_gpu"] == pytest.approx(2e9 * record["img_per_s_per_gpu"] / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops_per_gpu"] / 0.5)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == record
    line = capsys.readouterr().out.strip().splitlines()[-1]
    number = r"[\d.e+-]+"
    assert re.fullmatch(rf"step +2  loss {number}  lr 1\.00e-03  grad {number} \(max \S+ {number}\)  "
                        rf"{number} img/s \({number}/GPU\)  {number} TFLOP/s/GPU  MFU {number}%  "
                        rf"data-wait \d+%  skipped 1  bad 0",
                        line), line

    # On CPU without a configured peak: achieved TFLOP/s only, no MFU; without a FLOP count, neither.
    for flops, keys in ((2e9, {"tflops_per_gpu"}), (0.0, set())):
        metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines", train_flops_per_image=flops)
        metrics.add_step(torch.tensor(1.0), None, 0.0, [("bad-key", "OSError: truncated")])
        record = metrics.flush(3, 1e-3)
        assert {"tflops_per_gpu", "mfu"} & set(record) == keys and record["grad_norm_by_block"] == {}
        assert record["bad_samples"] == 1 and record["skipped_steps"] == 0
    assert "bad 1 (e.g. bad-key (OSError: truncated); each in bad_samples.jsonl" in capsys.readouterr().out


def test_a_skipped_step_adds_nothing_to_the_means_of_its_record(tmp_path):
    """A step the loop skips (NaN somewhere) counts in no mean of the record: not in the loss by timestep (its
    finite losses included) and not in the per-block norms (its finite groups included), as the loop gives it
    0 loss and grad norm and the record divides by the steps taken."""
    unet = tiny_unet()
    metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines")
    for grad, loss, skipped in ((1.0, 0.5, False), (3.0, 0.9, True)):
        for p in unet.parameters():
            p.grad = torch.full_like(p, grad)
        if skipped:
            unet.mid_block.resnets[0].conv1.weight.grad[0] = float("nan")
        metrics.add_micro_batch(torch.tensor([loss, float("nan") if skipped else loss]),
                                torch.tensor([10, 990]))
        metrics.add_grad_norms(unet)
        metrics.add_step(torch.tensor(0.0 if skipped else loss),
                         torch.tensor(0.0 if skipped else 1.0), 0.0, [],
                         skipped=torch.tensor(skipped))
    record = metrics.flush(2, 1e-3)
    assert record["skipped_steps"] == 1 and record["loss"] == pytest.approx(0.5)
    assert record["loss_by_t"][0] == pytest.approx(0.5) and record["loss_by_t"][-1] == pytest.approx(0.5)
    norms = record["grad_norm_by_block"]
    assert norms["conv_in"] == pytest.approx(math.sqrt(sum(p.numel() for p in unet.conv_in.parameters())))
    assert all(math.isfinite(v) for v in norms.values())


@pytest.mark.slow
def test_train_flops_are_forward_plus_backward_per_image():
    unet = tiny_unet()
    context = torch.zeros(1, 5, 64)
    flops = count_train_flops(unet, {"encoder_hidden_states": context}, autocast=False)
    assert all(p.grad is None for p in unet.parameters())  # it leaves no gradients behind

    def counted(batch: int, backward: bool, mapping=CPU_SDPA_FLOPS) -> int:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            out = unet(torch.zeros(batch, 4, 8, 8), torch.zeros(batch, dtype=torch.long),
                       context.expand(batch, -1, -1)).sample
            if backward:
                out.mean().backward()
        unet.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    forward = counted(1, backward=False)
    assert counted(2, backward=False) == 2 * forward  # FLOPs scale with the batch: "per image" is exact
    assert forward > counted(1, backward=False, mapping={})  # CPU attention kernels are counted
    assert 2.5 * forward < flops < 3 * forward  # backward ~ 2x forward (conv_in needs no input gradient)
    unet.enable_gradient_checkpointing()
    # recomputation is not model FLOPs
    assert count_train_flops(unet, {"encoder_hidden_states": context}, autocast=False) == flops
    assert unet.is_gradient_checkpointing


@pytest.mark.slow
def test_tensorboard_gets_scalars_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = start_tensorboard(True, tmp_path, start_step=0, config_toml="[log]\ntensorboard = true")
    metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines", tensorboard=writer)
    unet = tiny_unet()
    unet(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long),
         torch.zeros(1, 5, 64)).sample.mean().backward()
    metrics.add_micro_batch(torch.tensor([0.5, 0.25]), torch.tensor([10, 990]))
    metrics.add_grad_norms(unet)
    metrics.add_step(torch.tensor(0.375), torch.tensor(1.5), 0.0, [])
    metrics.flush(3, 1e-3)
    grid = make_grid(torch.zeros(2, 3, 8, 8), nrow=2)
    grid.save(tmp_path / "grid.png")
    metrics.log_image(3, tmp_path / "grid.png", "two prompts")
    metrics.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm", "img_per_s_per_gpu", "data_wait_share", "skipped_steps", "loss_t0",
            "loss_t9",
            "grad_norm/down_blocks.0", "grad_norm/mid_block"} <= set(tags["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [3] and loss[0].value == pytest.approx(0.375)
    assert events.Scalars("loss_t9")[0].value == pytest.approx(0.25)
    assert tags["images"] == ["samples"]
    image = events.Images("samples")[0]
    assert image.step == 3 and (image.width, image.height) == grid.size


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reference", "upload"])
def test_checkpoint_artifacts_in_wandb_offline(mode, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # keep wandb's staging out of $HOME
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    ckpt = tmp_path / "checkpoints" / "step_0000002.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not really a checkpoint" * 100)
    monkeypatch.setenv("WANDB_PROJECT", "ldm_ddp-test")
    monkeypatch.setenv("WANDB_NAME", "artifacts")
    run = start_wandb("offline", tmp_path, {"log": {"wandb_checkpoints": mode}})
    assert run is not None and run.project == "ldm_ddp-test" and run.name == "artifacts"
    metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines", wandb_run=run, wandb_checkpoints=mode)
    metrics.log_checkpoint(ckpt, 2)
    metrics.close()
    # finish() may return before wandb's service has written the run file; teardown waits for it
    wandb.teardown()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads later
    data = run_file.read_bytes()
    assert (f"checkpoints-{run.id}".encode() in data and b"step_0000002.safetensors" in data
            and b"step_2" in data)
    assert (ckpt.as_uri().encode() in data) == (mode == "reference")
    staged = list((tmp_path / "wandb_data_dir").rglob("*"))
    assert any(p.is_file() and p.stat().st_size == ckpt.stat().st_size for p in staged) == (mode == "upload")


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_record(tmp_path):
    """metrics.jsonl and resumes.jsonl after a kill mid-write: the next record starts its own line."""
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # the write a kill cut short
    append_jsonl(path, {"step": 2, "loss": 0.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 0.5},
                                                                            {"step": 2, "loss": 0.25}]
    path.write_text('{"step": 1, "lo')  # nothing whole before the cut
    append_jsonl(path, {"step": 1})
    assert path.read_text() == '{"step": 1}\n'


def test_records_count_the_graphs_compiled_so_far(tmp_path):
    """One graph per input shape (e.g. per aspect-ratio bucket): the record says how many and their time."""
    from torch._dynamo import utils

    before = utils.counters["stats"]["unique_graphs"]
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    for n in (3, 4, 5):
        double(torch.ones(n))
    metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines")
    metrics.add_step(torch.tensor(1.0), None, 0.0, [])
    record = metrics.flush(1, 1e-3)
    assert record["compiled_graphs"] == before + 3 and record["compile_s"] >= 0


# Log-interval losses shaped as a real collapse (SD1.5, bf16, 2026-12-04): the v-prediction loss falls to
# ~0.10, jumps at step ~350 and stays at 0.375 (most gradients near 1e-4).
FALLING = [1.0, 0.6, 0.35, 0.22, 0.16, 0.13, 0.11, 0.10, 0.104, 0.098, 0.101, 0.097]


def test_the_watch_warns_once_when_the_loss_rises_and_stays():
    watch = LossWatch(2.0)
    said = [(i, watch.see(50 * i, x)) for i, x in enumerate(FALLING + [0.28] + [0.375] * 12, 1)]
    warnings = [(i, text) for i, text in said if text]
    assert len(warnings) == 1  # once per stretch above the bar, not at every interval of it
    i, text = warnings[0]
    assert i == len(FALLING) + 5  # the rise (0.28 counts too) and four more: five in a row above 2x
    assert "diverged" in text and "log.divergence_ratio" in text and f"step {50 * i}" in text
    assert "since step 650" in text  # the first interval above the bar


def test_the_watch_stays_quiet_through_a_recovered_spike_and_a_noisy_fall():
    spike = FALLING + [0.4, 0.35, 0.3, 0.21] + [0.1] * 10  # four intervals up, then back
    assert not any(LossWatch(2.0).see(i, x) for i, x in enumerate(spike))
    gen = torch.Generator().manual_seed(0)
    noisy = [0.1 * (1 + 0.3 * float(torch.randn((), generator=gen))) for _ in range(400)]  # +-30%
    assert not any(LossWatch(2.0).see(i, x) for i, x in enumerate(FALLING + noisy))
    assert not any(LossWatch(0.0).see(i, x) for i, x in enumerate(FALLING + [0.375] * 10))  # off


def test_the_watch_warns_again_after_a_recovery_and_a_second_rise(tmp_path, capsys):
    metrics = Metrics(tmp_path, CPU, 1000, 10, 2, "lines", divergence_ratio=2.0)
    curve = FALLING + [0.375] * 6 + [0.1] * 6 + [0.375] * 6
    for step, loss in enumerate(curve, 1):
        metrics.add_step(torch.tensor(loss), None, 0.0, [])
        metrics.flush(step, 1e-3)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning: the loss")]
    assert len(lines) == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(curve)  # records unchanged


def test_a_resumed_run_keeps_the_watchs_history_and_is_warned_at_once_if_still_up(tmp_path, capsys):
    for step, loss in enumerate(FALLING + [0.375] * 3, 1):  # the records an attempt left before its resume
        append_jsonl(tmp_path / "metrics.jsonl", {"step": step, "loss": loss})
    metrics = Metrics(tmp_path, CPU, 1000, 100, 2, "lines", divergence_ratio=2.0)
    steps = len(FALLING) + 3
    for step in (steps + 1, steps + 2):  # two more intervals up: five in a row across the resume
        metrics.add_step(torch.tensor(0.375), None, 0.0, [])
        metrics.flush(step, 1e-3)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning: the loss")]
    assert len(lines) == 1 and f"at step {steps + 2}" in lines[0]
    assert f"since step {len(FALLING) + 1}" in lines[0]  # the stretch began before the resume
    fresh = Metrics(tmp_path / "other", CPU, 1000, 100, 2, "lines", divergence_ratio=2.0)
    assert fresh.watch.best == math.inf  # a new run folder starts with no history
