"""The golden run: 20 steps of a tiny config give the per-step losses and the final UNet, EMA and optimizer
tensors recorded in tests/fixtures (golden_losses.json names the commit that wrote them), to the bit.

A change that alters a single draw, an operation's order or a checkpoint tensor fails here. A change meant
to alter them re-records the fixture (`python tests/test_golden.py`, on the torch and CPU it names) and says
why in its commit. first_release_step_0000020.safetensors, the golden checkpoint as the format's first
release wrote it, stays as it is: loading and resuming from it is tested.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET, train_here

from ldm_ddp.checkpoint import load_checkpoint
from ldm_ddp.models import load_trained

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CKPT = FIXTURES / "golden_step_0000020.safetensors"
FIRST_RELEASE_CKPT = FIXTURES / "first_release_step_0000020.safetensors"


def golden_args(tmp_path: Path, out: Path, **changes) -> list[str]:
    unet_json = tmp_path / "tiny_unet.json"
    unet_json.write_text(json.dumps(TINY_UNET))
    values = {"model.unet": str(unet_json), "train.out_dir": str(out), "train.max_steps": 20,
              "train.device": "cpu", "train.precision": "fp32", "train.global_batch": 4,
              "data.batch_per_gpu": 2, "data.num_workers": 0, "data.shapes_num_samples": 64,
              "optim.warmup_steps": 5, "ema.extra_decays": [0.9], "ckpt.every": 20, "log.every": 1,
              "log.progress": "lines", "log.wandb": "disabled", "sample.every": 0}
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, exact: bool, name: str) -> None:
    if exact:
        assert torch.equal(actual, expected), f"{name} differs from the golden run"
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6,
                                   msg=f"{name} differs from the golden run")


def test_twenty_steps_match_the_golden_run(tmp_path):
    recorded = json.loads((FIXTURES / "golden_losses.json").read_text())
    # The same torch and CPU kernels give the same bits; another torch release or CPU instruction set
    # (AVX-512 against AVX2) may round differently in the last place, so there the comparison is close.
    exact = (recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
             and recorded["torch"] == torch.__version__)
    out = tmp_path / "run"
    train_here(*golden_args(tmp_path, out))
    expected_losses = [float.fromhex(x) for x in recorded["losses"]]
    if exact:
        assert losses(out) == expected_losses
    else:
        assert losses(out) == pytest.approx(expected_losses, rel=1e-4)
    now, meta = load_checkpoint(out / "checkpoints" / "step_0000020.safetensors")
    golden, golden_meta = load_checkpoint(GOLDEN_CKPT)
    assert sorted(now) == sorted(golden)
    for prefix in ("unet.", "ema.", "ema_0p9.", "optim."):
        assert any(k.startswith(prefix) for k in golden), prefix
    for name in golden:
        assert_same(now[name], golden[name], exact, name)
    assert meta["optim"] == golden_meta["optim"] and meta["ema"] == golden_meta["ema"]
    assert meta["step"] == golden_meta["step"] == 20 and meta["samples_seen"] == golden_meta["samples_seen"]


def test_a_checkpoint_of_the_first_format_release_resumes(tmp_path):
    """The golden checkpoint as the format's first release wrote it loads, and a run continues from it."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(FIRST_RELEASE_CKPT, out / "checkpoints" / "step_0000020.safetensors")
    printed = train_here(*golden_args(tmp_path, out, train__max_steps=22))
    assert "resumed from" in printed and "at step 20" in printed
    after, meta = load_checkpoint(out / "checkpoints" / "step_0000022.safetensors")
    golden, _ = load_checkpoint(FIRST_RELEASE_CKPT)
    assert meta["step"] == 22
    assert torch.equal(after["optim.conv_in.weight.step"], golden["optim.conv_in.weight.step"] + 2)
    assert not torch.equal(after["unet.conv_in.weight"], golden["unet.conv_in.weight"])
    # The tools read it too: its config names keys this version dropped (train.grad_accum, ema.compile, ...).
    cfg, unet, _ = load_trained(str(FIRST_RELEASE_CKPT), "ema:0.9", torch.device("cpu"))
    assert cfg.train.max_steps == 20 and torch.equal(unet.conv_in.weight, golden["ema_0p9.conv_in.weight"])


def record() -> None:
    """Run the golden config and write its losses (hex floats), the torch build, the CPU's instruction set
    and the commit into golden_losses.json, and its final checkpoint as GOLDEN_CKPT."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train_here(*golden_args(Path(tmp), out))
        shutil.copy(out / "checkpoints" / "step_0000020.safetensors", GOLDEN_CKPT)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=FIXTURES).stdout.strip()
        recorded = {"commit": commit, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "losses": [x.hex() for x in losses(out)]}
        (FIXTURES / "golden_losses.json").write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"recorded {GOLDEN_CKPT.name} and golden_losses.json at {commit[:7]}", file=sys.stderr)


if __name__ == "__main__":
    record()
