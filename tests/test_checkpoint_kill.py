"""A save killed at any moment (no handler, no `finally`: as with kill -9) leaves nothing that the next run's
start does not remove, and that run resumes from the previous checkpoint."""

import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from ldm_ddp import checkpoint as ckpt
from ldm_ddp.config import Config
from ldm_ddp.resume import resume_point

# One interpreter start for all kills: it forks a child per save (before any torch work, so no half-alive
# thread pool is copied) and prints the signal that ended each child.
KILLED_SAVES = r"""
import os, resource, signal, sys
import torch
from ldm_ddp import checkpoint

def save(ckpt_dir, kill_at):
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).square().sum().backward()
    optimizer.step()
    if kill_at == "before the rename":
        checkpoint.fsync = lambda path: os.kill(os.getpid(), signal.SIGKILL)
    else:
        # The kernel ends the process (SIGXFSZ, default action) at the write that would pass the file size
        # limit, whichever code issues it: at the first tensor, or halfway through the tensors
        # (weights, 2 moments).
        limit = 16 if kill_at == "at the first tensor" else 3 * sum(p.nbytes for p in model.parameters()) // 2
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    checkpoint.save_training_state(ckpt_dir, 200, checkpoint.TrainingState("unet", model, optimizer), {})

torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo (seconds) once, not per child
for ckpt_dir, kill_at in zip(sys.argv[1::2], sys.argv[2::2]):
    pid = os.fork()
    if pid == 0:
        save(ckpt_dir, kill_at)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}", flush=True)
"""

KILLED_BY = {"at the first tensor": signal.SIGXFSZ, "halfway through the tensors": signal.SIGXFSZ,
             "before the rename": signal.SIGKILL}
HALF_THE_TENSORS = 3 * 4 * (256 * 256 + 256) // 2


@pytest.mark.slow
def test_a_save_killed_anywhere_leaves_no_temp_file_after_the_next_start(tmp_path):
    folders = {kill_at: tmp_path / f"run{i}" / "checkpoints" for i, kill_at in enumerate(KILLED_BY)}
    for folder in folders.values():
        ckpt.save_checkpoint(folder, 100, {"unet.w": torch.ones(3)}, {})
    args = [str(a) for kill_at, folder in folders.items() for a in (folder, kill_at)]
    ended = subprocess.run([sys.executable, "-c", KILLED_SAVES, *args], cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=False)
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.split() == [str(int(sig)) for sig in KILLED_BY.values()], ended.stderr

    for kill_at, folder in folders.items():
        left = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith("step_")}
        assert resume_point(Config(), folder) == folder / "step_0000100.safetensors", kill_at
        assert [p.name for p in folder.iterdir()] == ["step_0000100.safetensors"], (kill_at, sorted(left))
        ckpt.load_checkpoint(folder / "step_0000100.safetensors")
        # Where the kill landed: the save's own temp file, cut at the size limit.
        ((name, data),) = left.items()
        assert name.startswith(".step_0000200.safetensors.tmp-"), kill_at
        if kill_at == "at the first tensor":  # a write past the limit writes nothing
            assert data == b""
        elif kill_at == "halfway through the tensors":  # the header (with the digests) is written last
            assert len(data) == HALF_THE_TENSORS and data[:8] == bytes(8)
