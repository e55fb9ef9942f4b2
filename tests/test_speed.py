"""The fast-path switches fail loudly at start (one line), or fall back with a warning when asked."""

import json
import math
import os
import signal

import pytest
import torch
from conftest import train_here

from ldm_ddp import faults, speed
from ldm_ddp.config import ConfigError


@pytest.mark.slow
def test_a_compile_asked_for_by_name_that_cannot_build_stops_at_start(tmp_path, tiny_args, monkeypatch):
    """train.compile=full where the compiler fails: one line naming the setting, before step 1 (the start-up
    probe), nothing saved. Compilation fails for real: dynamo traces the UNet, the backend raises."""
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=no_compiler))
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match=r"^train.compile=full failed at start \(\w+: .*no working C "
                                          r"compiler.*\); set train.compile=auto "
                                          r"\(falls back to eager\) or off$"):
        train_here(*tiny_args(tmp_path / "run", train__max_steps=1), "--train.compile=full")
    assert not (tmp_path / "run" / "checkpoints" / "step_0000001.safetensors").exists()


def test_probe_falls_back_only_when_asked(capsys):
    def cudnn_attention() -> None:  # the switch that fails on CPU, as the trainer's probe step runs it
        q = torch.randn(1, 2, 4, 8)
        with speed.attention("cudnn"):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    undone = []
    with pytest.raises(ConfigError, match=r"^model.sdpa_backend=cudnn failed at start \(RuntimeError: .*"
                                          r"set train.compile=auto \(falls back to eager\) or off$"):
        speed.probe(cudnn_attention, "model.sdpa_backend=cudnn", False, lambda: undone.append(1))
    assert not undone
    assert speed.probe(cudnn_attention, "model.sdpa_backend=cudnn", True, lambda: undone.append(1)) is False
    assert undone == [1] and "warning: model.sdpa_backend=cudnn failed at start" in capsys.readouterr().out
    assert speed.probe(lambda: None, "x", False, lambda: undone.append(2)) is True and undone == [1]


@pytest.mark.slow
def test_auto_compile_that_cannot_build_runs_eager_with_a_warning(tmp_path, tiny_args, monkeypatch):
    """train.compile=auto (the GPU default) where the compiler fails (no C compiler, an old GPU): the run was
    not asked to compile by name, so it warns and trains eager instead of stopping. Compilation fails for real
    here: dynamo traces the UNet and hands the graph to a backend that raises."""
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C compiler found")

    real_compile, real_mode = torch.compile, speed.compile_mode
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=no_compiler))
    monkeypatch.setattr(speed, "compile_mode", lambda setting, device: "full" if setting == "auto" else
                        real_mode(setting, device))  # auto as on CUDA
    torch._dynamo.reset()
    stdout = train_here(*tiny_args(tmp_path / "run", train__max_steps=2), "--train.compile=auto")
    warning = next(line for line in stdout.splitlines() if line.startswith("warning:"))
    assert "train.compile=full" in warning and "no working C compiler" in warning
    assert warning.endswith("continuing without it (train.compile=auto)")
    assert (tmp_path / "run" / "checkpoints" / "step_0000002.safetensors").is_file()


@pytest.mark.slow
def test_a_preempted_run_writes_its_open_profile(tmp_path, tiny_args, monkeypatch):
    """A stop inside the log.profile_at window still writes the record, with the steps it has."""
    from ldm_ddp.faults import Preempted

    real_before_step = speed.StepProfiler.before_step

    def before_step(self, step):
        if step == 3:  # inside the record of steps 2..4: SIGTERM, noted by the handler,
            # agreed at the next step
            os.kill(os.getpid(), signal.SIGTERM)
        real_before_step(self, step)

    monkeypatch.setattr(speed.StepProfiler, "before_step", before_step)
    with pytest.raises(Preempted, match="at step 4"):
        train_here(*tiny_args(tmp_path / "run", train__max_steps=8, log__profile_at=2))
    summary = json.loads((tmp_path / "run" / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == 2  # steps 3 and 4 recorded when the stop came


def test_attention_backends_select_a_kernel():
    q = torch.randn(1, 2, 4, 8)
    with speed.attention("math"):
        expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with speed.attention("auto"):
        assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, q, q), expected, atol=1e-6)


def test_regional_compile_compiles_each_repeated_module_in_place_and_is_undone():
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from ldm_ddp.config import ModelConfig
    from ldm_ddp.models import build_unet
    unet = build_unet(ModelConfig(), 8, 64)
    regions = speed.regions(unet)
    assert {type(r) for r in regions} >= {ResnetBlock2D, Transformer2DModel}
    assert sum(isinstance(r, ResnetBlock2D) for r in regions) == sum(
        isinstance(m, ResnetBlock2D) for m in unet.modules())  # every ResNet block, none twice
    names = [n for n, _ in unet.named_parameters()]
    model = speed.compile_model(unet, unet, "regional")
    assert model is unet and all(r._compiled_call_impl is not None for r in regions)
    assert unet._compiled_call_impl is None
    assert [n for n, _ in unet.named_parameters()] == names  # checkpoints keep their tensor names
    assert speed.uncompile(unet, model) is unet and all(r._compiled_call_impl is None for r in regions)
    assert speed.uncompile(unet, speed.compile_model(unet, unet, "full")) is unet


def test_device_busy_time_merges_overlapping_kernels():
    events = [{"cat": "kernel", "ts": 0, "dur": 10}, {"cat": "kernel", "ts": 5, "dur": 10},  # overlap: 0-15
              {"cat": "gpu_memcpy", "ts": 20, "dur": 5},
              {"cat": "cpu_op", "ts": 0, "dur": 100},  # host ops: ignored
              {"cat": "kernel", "ts": 21, "dur": 2}]  # inside the copy
    assert speed.device_busy_us({"traceEvents": events}) == 20


def _nets_with_gradients(count: int, scale: float = 1.0):
    """`count` copies of one small net with the same gradients (times `scale`); one parameter without."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)) for _ in range(count)]
    for net in nets:
        net.load_state_dict(nets[0].state_dict())
        torch.manual_seed(1)
        (net(torch.randn(3, 4)).pow(2).sum() * scale).backward()
        net[1].bias.grad = None  # a parameter without a gradient is left out
    return nets


def test_grad_norms_are_torchs_and_per_parameter():
    nets = _nets_with_gradients(2)
    before = [torch.linalg.vector_norm(p.grad) for p in nets[1].parameters() if p.grad is not None]
    total, norms = speed.grad_norms(nets[1])
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(nets[0].parameters(), float("inf")))
    assert len(norms) == 3
    torch.testing.assert_close(torch.stack(norms), torch.stack(before))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(nets[0].parameters(), nets[1].parameters())
               if a.grad is not None)  # the gradients are left as they are


@pytest.mark.parametrize("scale", [0.01, 1e3])
def test_clipping_inside_fused_adamw_is_torchs_clip_then_step(scale):
    """The clip as fused AdamW's divisor against clip_grad_norm_ then the step, over 3 steps: the same bits
    where no clip is needed, within a rounding of the gradient (2 ulp of the weights) where it is; the foreach
    optimizer's own pass agrees too."""
    nets = _nets_with_gradients(3, scale)
    optimizers = [torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.01, **kind)
                  for net, kind in zip(nets, ({"fused": True}, {"fused": True}, {"foreach": True}))]
    grads = [None if p.grad is None else p.grad.clone() for p in nets[0].parameters()]
    clipped = bool(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None])) > 1)
    assert clipped == (scale > 1)
    for _ in range(3):
        for net in nets:
            for p, g in zip(net.parameters(), grads):
                p.grad = None if g is None else g.clone()
        torch.nn.utils.clip_grad_norm_(nets[0].parameters(), 1.0)
        optimizers[0].step()
        for net, optimizer in zip(nets[1:], optimizers[1:]):
            total, _ = speed.grad_norms(net)
            faults.optimizer_step(optimizer, torch.isfinite(total), speed.clip_divisor(total, 1.0))
    reference, fused, foreach = ([p.detach() for p in net.parameters()] for net in nets)
    for a, b, c in zip(reference, fused, foreach):
        if clipped:
            torch.testing.assert_close(b, a, rtol=2 ** -22, atol=1e-7)
        else:
            assert torch.equal(b, a)
        torch.testing.assert_close(c, b, rtol=2 ** -22, atol=1e-7)
    assert speed.clip_divisor(torch.tensor(5.0), 0.0) is None  # max_norm 0: no clip
    assert speed.clip_divisor(torch.tensor(0.5), 1.0).item() == 1.0  # exactly 1 below the limit


@pytest.mark.slow
def test_a_compiled_run_saves_and_samples_like_an_eager_one(tmp_path, tiny_args, monkeypatch):
    """train.compile=full end to end, in process. Inductor would take minutes on this CPU, so torch.compile
    gets the aot_eager backend (speed.COMPILE_BACKEND): dynamo's capture and AOT autograd's joint graph are
    real, only the kernels are eager.
    Checkpoints hold the eager module's names (a resume loads into the eager module before compiling), live
    samples come from the uncompiled copy, and the run's numbers match an eager run's."""
    from ldm_ddp import dist
    from ldm_ddp.checkpoint import load_checkpoint
    from ldm_ddp.config import load_config
    from ldm_ddp.train_loop import train

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")

    def run(out, compile_mode, steps):
        cfg = load_config(overrides=[*tiny_args(out, train__max_steps=steps, sample__every=2),
                                     f"--train.compile={compile_mode}"])
        try:
            return train(cfg)
        finally:
            dist.shutdown()

    eager = run(tmp_path / "eager", "off", 2)
    compiled = run(tmp_path / "compiled", "full", 2)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    tensors, meta = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step_0000002.safetensors")
    reference, _ = load_checkpoint(tmp_path / "eager" / "checkpoints" / "step_0000002.safetensors")
    assert tensors.keys() == reference.keys() and not any("_orig_mod" in k for k in tensors)
    assert (tmp_path / "compiled" / "samples" / "step_0000002.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["compile_vae", "compile_text_encoder"])
def test_a_compiled_frozen_encoder_encodes_like_the_eager_one(tmp_path, tiny_args, monkeypatch, flag):
    """train.compile_vae (the online batches' VAE encoder) and train.compile_text_encoder: compiled in place
    (aot_eager here: dynamo's capture is real), the UNet eager; the run's numbers match an eager run's and its
    checkpoint keeps the eager names."""
    from ldm_ddp.checkpoint import load_checkpoint

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    compiled = []
    name_of = {"compile_vae": "compile_vae_encoder", "compile_text_encoder": "compile_text_encoders"}[flag]
    real = getattr(speed, name_of)

    def spy(what, *args, **kwargs):  # the modules compiled (the VAE's: where its switch let it)
        result = real(what, *args, **kwargs)
        if result is not False:
            compiled.append(what)
        return result

    monkeypatch.setattr(speed, name_of, spy)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for name, value in (("eager", "false"), ("compiled", "true")):
        train_here(*tiny_args(tmp_path / name, train__max_steps=2), f"--train.{flag}={value}")
    module = compiled[0].encoder if flag == "compile_vae" else compiled[0].text_encoder
    assert len(compiled) == 1 and module._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the encoder's, the UNet eager
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()
                     if '"loss"' in line] for name in ("eager", "compiled")}
    assert losses["compiled"] and losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    tensors, _ = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step_0000002.safetensors")
    reference, _ = load_checkpoint(tmp_path / "eager" / "checkpoints" / "step_0000002.safetensors")
    assert tensors.keys() == reference.keys()


@pytest.mark.slow
def test_the_vae_encoder_compiles_by_default_on_cuda_only_and_a_failed_compile_is_named(monkeypatch, capsys):
    """train.compile_vae: auto leaves the encoder eager on a CPU; a compile that fails in the probe stops the
    run when asked for by name (on) and, with auto, warns and leaves the encoder eager."""
    from conftest import TINY_VAE
    from diffusers import AutoencoderKL

    from ldm_ddp.config import Config, config_from_dict

    def broken(graph, inputs):  # a backend that cannot build the graph
        raise RuntimeError("no kernel for this graph")

    vae = AutoencoderKL(**TINY_VAE)
    cpu = torch.device("cpu")
    assert Config().train.compile_vae == "auto"
    assert config_from_dict({"train": {"compile_vae": False}}).train.compile_vae == "off"  # older checkpoints
    assert speed.compile_vae_encoder(vae, cpu, "auto", 2, (32, 32)) is False
    assert speed.compile_vae_encoder(vae, cpu, "off", 2, (32, 32)) is False
    assert vae.encoder._compiled_call_impl is None
    monkeypatch.setattr(speed, "COMPILE_BACKEND", broken)
    torch._dynamo.reset()
    failed = (r"^train.compile_vae failed at start \(.*no kernel for this graph.*\); "
              r"set train.compile_vae=auto \(falls back to eager\) or off$")
    with pytest.raises(ConfigError, match=failed):
        speed.compile_vae_encoder(vae, cpu, "on", 2, (32, 32))
    vae.encoder._compiled_call_impl = None
    # auto on CUDA: this machine's probe fails (no CUDA here, or the broken backend): eager, with a warning
    assert speed.compile_vae_encoder(vae, torch.device("cuda"), "auto", 2, (32, 32)) is False
    assert vae.encoder._compiled_call_impl is None
    assert "continuing without it (train.compile_vae=auto)" in capsys.readouterr().out
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    assert speed.compile_vae_encoder(vae, cpu, "on", 2, (32, 32)) is True
    assert vae.encoder._compiled_call_impl is not None


@pytest.fixture
def bench(monkeypatch):
    """scripts/bench.py as a module (with the scripts folder on the path only for the test)."""
    import importlib
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    return importlib.import_module("bench")


@pytest.mark.slow
def test_bench_kill_and_resume_continues_the_loss_curve(tmp_path, tiny_args, bench):
    """bench.py --parts resume (its kill-and-resume check) on CPU: saved at step 10, killed -9 later, resumed
    by the same command; the steps done twice give the same losses."""
    out = tmp_path / "run"
    run_args = [*tiny_args(out, train__max_steps=40, ckpt__every=10, log__every=1), "--ckpt.resume=auto"]
    result = bench.kill_and_resume(1, run_args, out, save_at=10, every=1, timeout=300)
    assert 11 <= result["killed_after_step"] < 40 and result["final_step"] == 40
    assert result["redone"] and result["redone"][0][0] == 11  # resumed from the step-10 checkpoint
    assert result["redone_max_rel_diff"] == 0.0  # CPU: bit for bit
    assert math.isfinite(result["loss_before"]) and math.isfinite(result["loss_after"])


def test_layout_opt_is_forced_only_for_channels_last_weights_and_auto_only_for_one_graph(monkeypatch):
    assert speed.layout_opt("auto", True, 1) and not speed.layout_opt("auto", True, 2)
    assert speed.layout_opt("auto", True, 2, "whole") and not speed.layout_opt("auto", True, 2, "split")
    assert speed.layout_opt("on", True, 8) and not speed.layout_opt("off", True, 1)
    assert not speed.layout_opt("on", False, 1)  # contiguous weights: nothing to keep
    asked, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: asked.append(kw) or real_compile(model, **kw))
    monkeypatch.setattr(speed, "regions", lambda unet: [])  # no UNet here: nothing to compile in place
    module = torch.nn.Conv2d(4, 4, 3)
    assert speed.compile_model(module, module, "off", force_layout=True) is module and asked == []
    speed.compile_model(module, module, "regional", force_layout=True)  # measured for the whole graph only
    speed.compile_model(module, module, "full", force_layout=False)
    compiled = speed.compile_model(module, module, "full", force_layout=True)
    # inductor's option only
    speed.compile_model(module, module, "full", force_layout=True, backend="aot_eager")
    assert asked == [{"backend": "inductor"},
                     {"backend": "inductor", "options": {"force_layout_optimization": True}},
                     {"backend": "aot_eager"}] and compiled is not module
    import torch._inductor.config as inductor_config
    assert not inductor_config.force_layout_optimization  # for that compile only, not for the process


@pytest.mark.slow
def test_waiting_for_an_attempts_processes_spares_the_caller(tmp_path):
    """chaos.wait_for_exit_of_all kills what is left of an attempt after its timeout; a caller whose own
    command line names the run folder is not part of it and is not killed with it."""
    import subprocess
    import sys
    from pathlib import Path
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); import chaos; "
            "chaos.wait_for_exit_of_all(Path(sys.argv[1]), timeout=0.3); print('returned')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(scripts)],
                          capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "returned", (done.returncode, done.stderr[-500:])


def test_bench_trainer_rows_take_more_settings_last(bench):
    """bench.py --set KEY=VALUE reaches the trainer's command after its own settings (so it wins)."""
    import argparse
    args = argparse.Namespace(pretrained="bundle", steps=40, sample_every=0, compile="full", ema_every=1,
                              cuda_graphs="auto", fp8="off", grad_reduce="bf16", shard_optimizer="on",
                              set=["train.compile_vae=off", "data.batch_per_gpu=8"])
    command = bench.trainer_args(args, 256, 64, ["--data.source=folder"], "out", 10)
    assert command[-2:] == ["--train.compile_vae=off", "--data.batch_per_gpu=8"]
    assert "--train.grad_reduce=bf16" in command and "--train.shard_optimizer=on" in command
    assert command.index("--data.batch_per_gpu=64") < command.index("--data.batch_per_gpu=8")


def test_bench_table_prints_every_path_the_switches_and_the_resume(capsys, bench):
    """The table bench.py prints after a GPU run, on rows of its JSON's shape (a crash here would lose a
    run)."""
    bare = {"img_per_s": 600.0, "flops_per_image": 0.5e12, "matmul_tflops": 780.0, "peak_mem_gib": 39.6,
            "card": "NVIDIA H200", "profile": {"device_busy_share": 0.95},
            "variants": {"ceiling": 750.0, "ema_inline": 545.5, "ema_compiled": 630.0}}
    cache = {"img_per_s": 570.0, "data_wait_share": 0.001, "peak_mem_gib": 41.0}
    resume = {"saved_at": 20, "killed_after_step": 25, "final_step": 40, "redone": [[25, 0.5, 0.5]],
              "redone_max_rel_diff": 0.0, "loss_before": 0.51, "loss_after": 0.49, "wall_s": 100.0}
    row = {"res": 256, "gpus": 2, "batch_per_gpu": 128, "bare": bare, "cache": cache, "resume": resume,
           "switches": {"compile": "full", "layout_opt": "auto", "bucket_cap_mb": 25.0}}
    bench.print_table([row])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[3]: line.split() for line in lines if len(line.split()) > 3
            and line.split()[0] == "256"}
    ceiling_line, bare_line, cache_line = rows["ceiling"], rows["bare"], rows["cache"]
    assert bare_line[:6] == ["256", "2", "128", "bare", "600.0", "300.0"]
    assert bare_line[6] == f"{300.0 * 0.5 / 989.0:.1%}"  # MFU per GPU against 989 TFLOP/s
    assert ceiling_line[4] == "750.0" and ceiling_line[8] == "100.0%"  # the ceiling row, the first
    assert bare_line[8] == "80.0%" and cache_line[4] == "570.0" and cache_line[8] == "76.0%"  # of the ceiling
    assert [line.split()[3] for line in lines if line.startswith(" 256")] == ["ceiling", "bare", "cache"]
    assert ("card: NVIDIA H200" in lines
            and "switches: compile=full, layout_opt=auto, bucket_cap_mb=25.0" in lines)
    assert any(line.startswith("resume 256 px, 2 GPUs: saved at step 20, killed after step 25")
               for line in lines)
    variants = [line for line in lines if line.startswith("bare 256 px, 2 GPUs, ema_")]
    assert (len(variants) == 2 and "EMA after the optimizer step" in variants[0]
            and "torch.compile" in variants[1])
    assert variants[0].endswith("same process): 545.5 img/s (90.9% of the bare row)")
    assert variants[1].endswith("same process): 630.0 img/s (105.0% of the bare row)")
    bare.pop("variants")  # a bare row without a ceiling (an older JSON): shares of the bare step
    bench.print_table([row])
    cache_line = next(line.split() for line in capsys.readouterr().out.splitlines() if " cache " in line)
    assert cache_line[8] == "95.0%"
    row.pop("bare")  # a call without the bare step: the trainer's MFU from its own FLOP count
    bench.print_table([{**row, "cache": {**cache, "tflops_per_gpu": 247.25}}])
    cache_line = next(line.split() for line in capsys.readouterr().out.splitlines() if " cache " in line)
    assert cache_line[6] == "25.0%"  # 247.25 of 989 TFLOP/s


@pytest.mark.slow
def test_bench_bare_step_and_its_ema_variants_run_on_cpu(monkeypatch, capsys, bench):
    """bench.py's bare step (scripts/bench_bare.py, its torchrun worker) on CPU with a small UNet, in a
    one-rank gloo group so that DDP is on: the step as configured, the ceiling (no clipping, no EMA) and the
    EMA variants (the other setting of ema.overlap, the compiled update) are timed and reported in the BENCH
    line (also with the optimizer sharded in place of DDP), so that a crash shows here rather than in a GPU
    run; the CUDA-only calls are stood in for."""
    import sys

    import bench_bare
    import torch.distributed as torch_dist
    from conftest import free_port
    from diffusers import UNet2DConditionModel

    import ldm_ddp.dist as ldm_dist
    import ldm_ddp.ema as ema_module
    import ldm_ddp.models as models
    import ldm_ddp.speed as speed

    def small_unet(cfg, latent_size, context_dim, device, pooled_width=0):
        return UNet2DConditionModel(sample_size=latent_size, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                    cross_attention_dim=context_dim, attention_head_dim=8).train()

    real_init = ldm_dist.init

    def one_rank(device):
        torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                      world_size=1)
        return real_init("cpu")

    monkeypatch.setattr(models, "build_unet", small_unet)
    monkeypatch.setattr(ldm_dist, "init", one_rank)
    monkeypatch.setattr(ema_module, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(bench_bare, "matmul_tflops", lambda device: 1.0)
    for name, stand_in in (("synchronize", None), ("max_memory_allocated", 0),
                           ("reset_peak_memory_stats", None),
                           ("get_device_name", "cpu")):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=stand_in: value)
    calls = {"clip": 0, "ema": 0}
    clip, update = speed.grad_norms, ema_module.EMA.update

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(speed, "grad_norms", counted("clip", clip))
    monkeypatch.setattr(ema_module.EMA, "update", counted("ema", update))
    for switches, variants in ((["--ema-compile", "both"], ["ceiling", "ema_beside_forward", "ema_compiled"]),
                               (["--ema-overlap", "on"], ["ceiling", "ema_inline"]),
                               (["--shard-optimizer", "on"], ["ceiling", "ema_beside_forward"])):
        calls.update(clip=0, ema=0)
        monkeypatch.setattr(sys, "argv",
                            ["bench_bare.py", "--res", "64", "--batch", "2", "--steps", "3", "--warmup", "1",
                             "--compile", "off", *switches])
        try:
            assert bench_bare.main() == 0
        finally:
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("BENCH "))
        result = json.loads(line[len("BENCH "):])
        assert result["img_per_s"] > 0 and result["flops_per_image"] > 0
        assert sorted(result["variants"]) == variants and min(result["variants"].values()) > 0
        # 1 warmup step, then 2 halves of 2 steps for the step as configured and each variant: the ceiling's
        # 4 steps neither clip nor update the EMA
        steps = 1 + 2 * 2 * (1 + len(variants))
        assert calls == {"clip": steps - 4, "ema": steps - 4}


def test_kernel_sources_name_the_host_ops_that_launched_each_kernel():
    """A trace of two steps: a copy kernel launched inside convolution_backward > contiguous, another from a
    plain copy_, and a kernel whose launch was not recorded; sums per (op chain, kernel), costliest first."""
    def op(name, ts, dur, tid=1):
        return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(ts, corr, tid=1):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
                "args": {"correlation": corr}}

    def kernel(name, corr, dur):
        return {"cat": "kernel", "name": name, "ts": 1000 + corr, "dur": dur, "tid": 7,
                "args": {"correlation": corr}}

    events = []
    for step, t0 in enumerate((0, 100)):
        events += [op("aten::convolution_backward", t0, 50), op("aten::contiguous", t0 + 5, 10),
                   op("aten::copy_", t0 + 6, 5), launch(t0 + 7, 10 * step + 1),
                   launch(t0 + 30, 10 * step + 2),  # inside convolution_backward only
                   op("aten::copy_", t0 + 60, 5), launch(t0 + 61, 10 * step + 3),  # after the conv ended
                   kernel("copy_kernel", 10 * step + 1, 40), kernel("wgrad", 10 * step + 2, 30),
                   kernel("copy_kernel", 10 * step + 3, 5), kernel("nccl", 10 * step + 4, 1)]
    rows = speed.kernel_sources({"traceEvents": events}, depth=3)
    assert rows == [("aten::convolution_backward > aten::contiguous > aten::copy_", "copy_kernel", 2, 80.0),
                    ("aten::convolution_backward", "wgrad", 2, 60.0),
                    ("aten::copy_", "copy_kernel", 2, 10.0),
                    ("", "nccl", 2, 2.0)]
    assert speed.kernel_sources({"traceEvents": events}, depth=1)[0][0] == "aten::copy_"


def test_ddp_compile_applies_only_to_the_whole_unet_compile_under_ddp(monkeypatch):
    import torch._dynamo

    assert (speed.ddp_compile("whole", "full", 2) == "whole"
            and speed.ddp_compile("split", "full", 8) == "split")
    assert speed.ddp_compile("whole", "full", 1) == "split"  # one process: no DDP, torch's default left alone
    assert speed.ddp_compile("whole", "regional", 2) == speed.ddp_compile("whole", "off", 2) == "split"
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)
    speed.use_ddp_compile("whole")
    assert torch._dynamo.config.optimize_ddp == "no_optimization"  # dynamo: no graph cut at DDP's buckets
    speed.use_ddp_compile("split")
    assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"


def test_full_compile_makes_one_static_graph_per_bucket_shape(monkeypatch):
    """Buckets (shapes > 1): each micro-batch shape gets its own static graph, compiled on first use and
    reused after; none becomes a shape-generic (dynamic) graph, and the recompile limit admits them all
    even where it was set below their number."""
    from torch._dynamo import utils

    # one process, no DDP: dynamo reads this setting when it compiles (another test may have deleted it)
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", "ddp_optimizer", raising=False)
    torch._dynamo.reset()
    saved = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    try:
        module = torch.nn.Conv2d(4, 4, 3, padding=1)
        shapes = [(2, 4, 8, 8), (2, 4, 6, 10), (2, 4, 10, 6), (2, 4, 4, 16)]
        compiled = speed.compile_model(module, module, "full", backend="eager", shapes=len(shapes))
        assert torch._dynamo.config.recompile_limit >= len(shapes)
        before = utils.counters["stats"]["unique_graphs"]
        for _ in range(2):  # the second pass reuses every graph
            for shape in shapes:
                x = torch.randn(shape)
                assert torch.equal(compiled(x), module(x))
        graphs = utils.counters["stats"]["unique_graphs"] - before
        assert graphs == len(shapes)  # a shape-generic graph after the second shape would make 2
    finally:
        torch._dynamo.config.recompile_limit = saved
        torch._dynamo.reset()


def test_bench_figures_leave_out_warm_up_compiles_older_runs_and_a_cut_line(tmp_path, bench):
    """The trainer benches' figures: the first log interval and any in which a graph was compiled are not
    steady; bench_sdxl reads only the records its own run wrote (a resumed run's folder holds older ones), and
    a killed run's last line may be cut."""
    import importlib
    bench_sdxl = importlib.import_module("bench_sdxl")
    rows = [{"step": 10, "img_per_s": 1.0, "compiled_graphs": 1, "time": 100.0, "loss": 0.5},
            {"step": 20, "img_per_s": 10.0, "compiled_graphs": 1, "time": 110.0, "loss": 0.4},
            {"step": 30, "img_per_s": 4.0, "compiled_graphs": 2, "time": 120.0, "loss": 0.3},
            {"step": 40, "img_per_s": 12.0, "compiled_graphs": 2, "time": 130.0, "loss": 0.2,
             "peak_mem_gib": 7.5}]
    lines = [json.dumps({**r, "data_wait_share": 0.01}) + "\n" for r in rows]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 50, "lo')
    assert [r["step"] for r in bench_sdxl.records_since(tmp_path, 110.0)] == [20, 30, 40]
    figures = bench_sdxl.interval_figures(bench_sdxl.records_since(tmp_path, 0.0), 0, 40)
    assert figures["img_per_s"] == 11.0 and figures["intervals"] == 2 and figures["peak_mem_gib"] == 7.5
    assert bench_sdxl.interval_figures(bench_sdxl.records_since(tmp_path, 0.0), 20, 40)["img_per_s"] == 12.0
    steady = bench.steady_figures(tmp_path)  # also drops the last interval (the final save, the profiler)
    assert steady["img_per_s"] == 10.0 and steady["compiled_graphs"] == 2
    assert math.isnan(steady["tflops_per_gpu"])  # CPU records carry no FLOP rate: nan, not 0

