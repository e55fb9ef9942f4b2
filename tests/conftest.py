"""Shared fixtures: a tiny UNet and VAE config, the overrides of a tiny fast run, a subprocess runner, and a
script's main() run in process."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Small enough that a CPU step takes milliseconds; cross_attention_dim is the demo text encoder's width.
TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 1.0,
}


@pytest.fixture(scope="session")
def tiny_unet_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture(scope="session")
def tiny_vae_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny_vae.json"
    path.write_text(json.dumps(TINY_VAE))
    return path


@pytest.fixture(scope="session")
def tiny_args(tiny_unet_json):
    """-> a function (out_dir, **changes) -> ["--section.key=value", ...] for a tiny, fast training run.

    `changes` use `section__key=value` names, e.g. tiny_args(out, train__max_steps=6).
    """
    def build(out_dir, **changes) -> list[str]:
        values = {
            "model.unet": str(tiny_unet_json),
            "train.out_dir": str(out_dir),
            "train.max_steps": 4,
            "train.precision": "fp32",
            "data.batch_per_gpu": 2,
            "data.num_workers": 0,
            "data.shapes_num_samples": 64,
            "optim.schedule": "constant",
            "optim.warmup_steps": 2,
            "ckpt.every": 2,
            "log.every": 1,
            "log.progress": "lines",
            "log.wandb": "disabled",
            "sample.every": 0,
            "sample.steps": 2,
            "sample.prompts": ["a large red circle in the center", "a small blue square in the top left"],
        }
        values.update({k.replace("__", "."): v for k, v in changes.items()})
        return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return build


def script_env() -> dict:
    """The environment of a child run: one thread per process (2 procs share 2 cores), no launcher vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONFAULTHANDLER="1")  # a child that crashes in native code prints its Python stacks
    return env


def run_main(script: str, *args) -> int:
    """scripts/<script>.py's main() in this process (no interpreter start-up): -> its exit code."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "scripts"))  # the scripts' `import _path`
        spec = importlib.util.spec_from_file_location(f"script_{script}", REPO / "scripts" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        patch.setattr("sys.argv", [script, *map(str, args)])
        return module.main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, out: str, work) -> None:
    import torch
    import torch.distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(work(rank), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def on_gloo_ranks(work, world: int, out) -> list:
    """`work(rank)` (a module-level function) in `world` processes joined in one gloo group on CPU;
    -> what each returned (passed through torch.save in `out`), in rank order."""
    import torch
    import torch.multiprocessing
    torch.multiprocessing.spawn(_gloo_rank, args=(world, free_port(), str(out), work), nprocs=world)
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="session")
def run_script():
    """-> a function (script, *args, nproc=1, timeout=...) -> CompletedProcess, run from the repo root.

    `env` adds to (or, with None values, removes from) the child's environment.
    nproc > 1 launches under `python -m torch.distributed.run` on a free port (gloo on CPU).
    """
    def run(script: str, *args, nproc: int = 1, timeout: float = 90, env: dict | None = None):
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                         "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        child_env = {k: v for k, v in {**script_env(), **(env or {})}.items() if v is not None}
        return subprocess.run(launcher + [script, *map(str, args)], cwd=REPO, env=child_env,
                              capture_output=True, text=True, timeout=timeout)
    return run


def train_here(*args) -> str:
    """scripts/train.py's training in this process, one rank (no interpreter start-up, ~6 s less than a
    command): -> what it printed. Errors raise (ConfigError, CheckpointError, faults.Stop) instead of
    exiting."""
    import contextlib
    import io

    import torch

    from ldm_ddp import dist
    from ldm_ddp.config import load_config
    from ldm_ddp.train_loop import train

    printed, threads = io.StringIO(), torch.get_num_threads()
    # restored after the run: a stopped run ignores these signals
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        torch.set_num_threads(1)  # as a child run's OMP_NUM_THREADS=1 (script_env)
        with contextlib.redirect_stdout(printed):
            train(load_config(overrides=[str(a) for a in args]))
    finally:
        dist.shutdown()
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return printed.getvalue()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_args) -> Path:
    """A tiny 2-step run shared by the tool tests (read it, do not change its checkpoints)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_here(*tiny_args(out, train__max_steps=2))
    return out
