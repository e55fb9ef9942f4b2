"""The GPU fast path's precision and launch switches: train.cuda_graphs (the compiled UNet replayed as CUDA
graphs) and train.fp8 (torchao's float8 training of the transformer linears)."""
import copy

import pytest
import torch

from ldm_ddp import faults, speed
from ldm_ddp.config import ConfigError


def test_cuda_graphs_only_for_a_whole_compiled_unet_on_cuda_and_one_micro_batch(monkeypatch, capsys):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert speed.cuda_graphs("auto", cuda, "full", 1) and not speed.cuda_graphs("off", cuda, "full", 1)
    # auto: one GPU and one shape, as measured; on: also under DDP and with buckets
    assert not speed.cuda_graphs("auto", cuda, "full", 2) and speed.cuda_graphs("on", cuda, "full", 2)
    assert not speed.cuda_graphs("auto", cuda, "full", 1, shapes=3)
    assert speed.cuda_graphs("on", cuda, "full", 1, shapes=3)
    assert not any(speed.cuda_graphs(s, device, mode, 1) for s in ("auto", "on")
                   for device, mode in ((cuda, "regional"), (cuda, "off"), (cpu, "full")))
    assert capsys.readouterr().out.count("running without CUDA graphs") == 3  # only where asked for by name
    assert not speed.cuda_graphs("auto", cuda, "full", 1, grad_accum=2)
    with pytest.raises(ConfigError, match="accumulates 2"):
        speed.cuda_graphs("on", cuda, "full", 1, grad_accum=2)
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")  # only inductor records CUDA graphs
    assert not speed.cuda_graphs("on", cuda, "full", 1) and "running without" in capsys.readouterr().out
    asked = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: asked.append(kw) or model)
    module = torch.nn.Conv2d(4, 4, 3)
    speed.compile_model(module, module, "full", force_layout=True, cuda_graphs=True)
    speed.compile_model(module, module, "full", cuda_graphs=True, backend="aot_eager")  # inductor's option
    assert asked == [{"backend": "inductor", "options": {"force_layout_optimization": True,
                                                         "triton.cudagraphs": True}},
                     {"backend": "aot_eager"}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_unet_replayed_as_cuda_graphs_trains_like_the_eager_one():
    """Three fp32 training steps of a small UNet, eager and compiled whole as CUDA graphs, from the same
    weights and batches: the same losses and weights, so each replay's gradients reach the clip and the
    optimizer before the next replay overwrites the graphs' pool."""
    from diffusers import UNet2DConditionModel
    device = torch.device("cuda")
    torch._dynamo.reset()
    torch.manual_seed(0)
    start = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=8).to(device)
    batches = [(torch.randn(2, 4, 8, 8, device=device), torch.randint(0, 1000, (2,), device=device),
                torch.randn(2, 7, 32, device=device)) for _ in range(3)]
    results = []
    for mode in ("off", "full"):
        unet = copy.deepcopy(start)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
        model = speed.compile_model(unet, unet, mode, cuda_graphs=True)
        losses = []
        for x, t, context in batches:
            loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=context).sample, x)
            loss.backward()
            total, _ = speed.grad_norms(unet)
            faults.optimizer_step(optimizer, torch.isfinite(total), speed.clip_divisor(total, 1.0))
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, {k: v.clone() for k, v in unet.state_dict().items()}))
        torch._dynamo.reset()
    (eager, eager_weights), (graphed, graphed_weights) = results
    assert graphed == pytest.approx(eager, rel=1e-3)  # inductor against eager kernels: ~1e-4 apart
    # the weights: apart by under 1% of how far training moved them (Adam's update of a gradient near 0 can
    # flip sign between kernels, so not element by element)
    initial = start.state_dict()
    apart = sum((graphed_weights[k] - eager_weights[k]).abs().sum() for k in eager_weights)
    moved = sum((eager_weights[k] - initial[k]).abs().sum() for k in eager_weights)
    assert moved > 0 and apart < 0.01 * moved


def test_fp8_converts_the_transformer_linears_keeping_their_weights_and_names():
    """train.fp8 on a small UNet, torchao's FP8 matmul emulated on CPU: the transformer blocks' linears (8 per
    block: q, k, v, out of the self-attention, q and out of the cross-attention, the feed-forward's two) and
    nothing else become float8 (the cross-attention's keys and values of 77 text tokens stay bf16);
    the parameters are the same tensors under the same names; a bf16 step's loss and gradients stay within
    FP8's rounding of the bf16 ones."""
    pytest.importorskip("torchao.float8", reason="train.fp8 needs torchao (the fp8 extra)")
    from ldm_ddp.config import ModelConfig
    from ldm_ddp.models import build_unet
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet="demo"), 8, 64, "cpu", 0)
    plain = copy.deepcopy(unet)
    names, params = list(unet.state_dict()), dict(unet.named_parameters())
    blocks = sum(len(m) for name, m in unet.named_modules() if name.endswith("transformer_blocks"))
    assert speed.convert_fp8(unet, torch.device("cpu"), emulate=True) == 8 * blocks > 0
    converted = {name for name, m in unet.named_modules() if type(m).__name__ == "Float8Linear"}
    assert len(converted) == 8 * blocks and all(".transformer_blocks." in name for name in converted)
    assert not any(name.endswith(("attn2.to_k", "attn2.to_v")) for name in converted)
    assert "time_embedding.linear_1" not in converted  # the embeddings stay bf16
    assert list(unet.state_dict()) == names and all(p is params[n] for n, p in unet.named_parameters())
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 64)
    losses = []
    for model in (plain, unet):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=context).sample.float(), x)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (plain, unet)]
    assert torch.isfinite(grads[1]).all()
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.98


def test_fp8_is_refused_where_there_are_no_fp8_matmuls_and_with_dpo():
    with pytest.raises(ConfigError, match=r"train.fp8: needs a GPU with FP8 matmuls .* this run has cpu"):
        speed.convert_fp8(torch.nn.Linear(16, 16), torch.device("cpu"))
    from ldm_ddp.config import load_config
    with pytest.raises(ConfigError, match="train.fp8: expected false with train.objective = dpo"):
        load_config(overrides=["train.fp8=true"], preset="dpo_demo")


def test_the_fp8_bench_compares_its_curves_against_the_run_to_run_spread(tmp_path, monkeypatch, capsys):
    """scripts/bench_fp8.py's report (the GPU runs are its input): losses by window from metrics.jsonl, and
    the verdict from fp8's and the other seed's mean distance from the bf16 curve."""
    import json
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_fp8
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 50, "loss": 1.0}, {"step": 100, "loss": 0.5}, {"event": "save"},
               {"step": 150, "loss": 0.4}]
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    assert bench_fp8.window_losses(metrics, 100) == {100: 0.75, 200: 0.4}

    def write(folder, name, losses, img_per_s, host="h1"):
        (tmp_path / folder / name).mkdir(parents=True)
        (tmp_path / folder / name / "summary.json").write_text(json.dumps(
            {"run": name, "res": 256, "batch": 32, "steps": 400, "img_per_s": img_per_s, "peak_mem_gib": 20.0,
             "host": host, "window_losses": dict(zip(("100", "200", "300", "400"), losses))}))

    # compared over the second half (windows 300 and 400): the first fast drop does not count
    write("a", "bf16", (0.50, 0.30, 0.20, 0.18), 400.0)
    write("a", "bf16_seed1", (0.60, 0.32, 0.19, 0.17), 400.0)
    write("b", "fp8", (0.90, 0.31, 0.205, 0.185), 480.0)
    assert bench_fp8.report([str(tmp_path / "a"), str(tmp_path / "b")], 100) == 0
    out = capsys.readouterr().out
    assert "fp8 against bf16: +20.0% img/s\n" in out
    assert "fp8 0.00500 apart (+0.00500 on average), bf16_seed1 0.01000 (-0.01000)" in out
    assert "the curves agree" in out
    write("c", "fp8", (0.50, 0.30, 0.30, 0.28), 480.0, host="h2")  # a later call's run replaces the first
    bench_fp8.report([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")], 100)
    out = capsys.readouterr().out
    assert "do not agree" in out and "(other hosts: compare bench.py --fp8 on/off" in out
    # a run whose call ended before its summary (during its final save): read from its metrics.jsonl
    (tmp_path / "d" / "fp8").mkdir(parents=True)
    (tmp_path / "d" / "fp8" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "loss": loss, "img_per_s": 300.0, "data_wait_share": 0.0}) + "\n"
        for step, loss in zip(range(50, 401, 50), (0.6, 0.4, 0.31, 0.29, 0.21, 0.19, 0.17, 0.19))))
    bench_fp8.report([str(tmp_path / "a"), str(tmp_path / "d")], 100)
    out = capsys.readouterr().out
    assert "400 steps (cut short: no summary; from its metrics.jsonl)" in out
    assert "fp8 0.00000 apart (+0.00000 on average)" in out and "the curves agree" in out


def test_a_run_asking_for_fp8_without_fp8_matmuls_stops_before_step_1(tmp_path, tiny_args):
    from conftest import train_here
    with pytest.raises(ConfigError, match="train.fp8: needs a GPU with FP8 matmuls"):
        train_here(*tiny_args(tmp_path / "run", train__fp8=True, train__device="cpu"))
    assert not list((tmp_path / "run").glob("checkpoints/*.safetensors"))
