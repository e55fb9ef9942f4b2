"""The safetensors training-state format: bitwise round trip, refusal of damaged files, fallback, pruning."""

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, run_main
from safetensors import safe_open

from ldm_ddp import checkpoint as ckpt
from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.checkpoint_info import describe_checkpoint


class Tiny(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        self.norm_out = torch.nn.LayerNorm(4)

    def forward(self, x):
        h = self.conv_in(x).mean((2, 3))
        for block in self.blocks:
            h = h + torch.nn.functional.gelu(block(h))
        return self.norm_out(h)


def train(model, opt, first_step: int, n: int) -> None:
    for step in range(first_step, first_step + n):
        g = torch.Generator().manual_seed(step)
        loss = model(torch.randn(3, 2, 5, 5, generator=g)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def names(model) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def save(tmp_path: Path, step: int, model, opt, **meta) -> Path:
    tensors = {f"unet.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in model.state_dict().items()})
    optim, groups = ckpt.optimizer_tensors(opt, names(model))
    tensors.update(optim)
    return ckpt.save_checkpoint(tmp_path, step, tensors, {"optim": groups, "samples_seen": step * 6, **meta})


@pytest.fixture
def trained():
    model = Tiny(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 0, 3)
    return model, opt


def saved_steps(tmp_path: Path, trained, steps) -> list[Path]:
    model, opt = trained
    return [save(tmp_path, s, model, opt) for s in steps]


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("kwargs", [{}, {"foreach": True}, {"foreach": False}, {"fused": True},
                                    {"foreach": True, "amsgrad": True}], ids=str)
def test_round_trip_is_bitwise(tmp_path, kwargs):
    model = Tiny(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    train(model, opt, 0, 3)
    path = save(tmp_path, 3, model, opt)

    # A fresh run with other weights and other hyperparameters: the checkpoint must restore both.
    resumed = Tiny(1)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.5, weight_decay=0.0, **kwargs)
    tensors, meta = ckpt.load_checkpoint(path)
    resumed.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ckpt.load_optimizer_tensors(resumed_opt, dict(resumed.named_parameters()), tensors, meta["optim"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2 and resumed_opt.param_groups[0]["betas"] == (0.9, 0.999)

    train(model, opt, 3, 2)
    train(resumed, resumed_opt, 3, 2)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        for key, value in opt.state[p].items():
            other = resumed_opt.state[q][key]
            assert (value.dtype, value.device) == (other.dtype, other.device), (name, key)
            assert torch.equal(value, other), (name, key)


def test_keys_are_names_and_metadata_is_json(tmp_path, trained):
    model, opt = trained
    path = save(tmp_path, 3, model, opt, config={"optim": {"lr": 1e-2}, "name": "tiny"}, world_size=8)
    assert path.name == "step_0000003.safetensors"
    tensors, meta = ckpt.load_checkpoint(path)
    assert {"unet.blocks.1.weight", "ema.conv_in.bias", "optim.blocks.1.weight.exp_avg",
            "optim.blocks.1.weight.exp_avg_sq", "optim.norm_out.bias.step"} <= tensors.keys()
    assert not any(k.split(".")[1].isdigit() for k in tensors if k.startswith("optim."))
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 3 and meta["samples_seen"] == 18
    assert meta["config"] == {"optim": {"lr": 1e-2}, "name": "tiny"} and meta["world_size"] == 8
    assert meta["optim"][0]["params"] == [n for n, _ in model.named_parameters()]
    assert set(meta["integrity"]["tensors"]) == set(tensors)
    assert ckpt.read_metadata(path)["config"] == meta["config"]
    with safe_open(path, framework="pt") as f:
        assert all(isinstance(json.loads(v), object) for v in f.metadata().values())


def test_load_names_the_missing_or_extra_parameter(tmp_path, trained):
    model, opt = trained
    tensors, meta = ckpt.load_checkpoint(save(tmp_path, 3, model, opt))
    bigger = Tiny(0)
    bigger.extra = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=r"parameter extra\.bias missing from the checkpoint"):
        ckpt.load_optimizer_tensors(torch.optim.AdamW(bigger.parameters()), dict(bigger.named_parameters()),
                                    tensors, meta["optim"])
    smaller = Tiny(0)
    del smaller.norm_out
    smaller.norm_out = torch.nn.Identity()
    with pytest.raises(CheckpointError, match=r"checkpoint parameter norm_out\.bias is not in the model"):
        ckpt.load_optimizer_tensors(torch.optim.AdamW(smaller.parameters()), dict(smaller.named_parameters()),
                                    tensors, meta["optim"])


def test_reserved_metadata_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_checkpoint(tmp_path, 1, {"unet.w": torch.ones(2)}, {"step": 5})


def corrupt_data_byte(path):
    flip(path, (header_len(path) + path.stat().st_size) // 2)


def corrupt_header_byte(path):
    flip(path, header_len(path) // 2)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def drop_middle_byte(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 1:])


def append_byte(path):
    path.write_bytes(path.read_bytes() + b"\0")


def empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [corrupt_data_byte, corrupt_header_byte, truncate, drop_middle_byte,
                                    append_byte, empty], ids=lambda f: f.__name__)
def test_damaged_file_is_refused_naming_it(tmp_path, trained, damage):
    (path,) = saved_steps(tmp_path, trained, [300])
    damage(path)
    with pytest.raises(CheckpointError, match=r"^step_0000300\.safetensors: ") as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_every_header_byte_and_sampled_data_bytes_are_covered(tmp_path):
    """A flip anywhere in the header (two masks) or the data region is refused."""
    model = torch.nn.Linear(3, 2)
    path = ckpt.save_checkpoint(tmp_path, 7, {"unet.w": model.weight, "unet.b": model.bias,
                                              "other.bf16": torch.ones(3, dtype=torch.bfloat16)},
                                              {"note": "x"})
    pristine = path.read_bytes()
    offsets = [(i, m) for i in range(header_len(path)) for m in (0x01, 0xFF)]
    offsets += [(i, 0x80) for i in range(header_len(path), len(pristine))]
    for offset, mask in offsets:
        path.write_bytes(pristine)
        flip(path, offset, mask)
        with pytest.raises(CheckpointError):
            ckpt.load_checkpoint(path)


def test_metadata_step_must_match_file_name(tmp_path, trained):
    (path,) = saved_steps(tmp_path, trained, [100])
    path.rename(tmp_path / "step_0000200.safetensors")
    with pytest.raises(CheckpointError, match="metadata step 100 does not match"):
        ckpt.load_checkpoint(tmp_path / "step_0000200.safetensors")


def test_list_ignores_temp_files_and_sorts_by_step(tmp_path, trained):
    saved_steps(tmp_path, trained, [20_000_000, 5, 100])
    (tmp_path / ".step_0000300.safetensors.tmp-123").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step_0000005.safetensors", "step_0000100.safetensors", "step_20000000.safetensors"]
    assert ckpt.list_checkpoints(tmp_path / "absent") == []


def test_find_latest_valid_falls_back_and_logs(tmp_path, trained):
    paths = saved_steps(tmp_path, trained, [100, 200, 300])
    corrupt_data_byte(paths[2])
    logs = []
    assert ckpt.find_latest_valid(tmp_path, logs.append) == paths[1]
    assert len(logs) == 2
    assert "step_0000300.safetensors" in logs[0] and "digest mismatch" in logs[0]
    assert "falling back to step_0000200.safetensors" in logs[1]
    for path in paths[:2]:
        empty(path)
    logs.clear()
    assert ckpt.find_latest_valid(tmp_path, logs.append) is None
    assert len(logs) == 4 and "no valid checkpoint" in logs[-1]


def test_prune_keeps_last_k(tmp_path, trained):
    saved_steps(tmp_path, trained, [100, 200, 300, 400, 500])
    ckpt.prune_checkpoints(tmp_path, keep=2, log=lambda line: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000400.safetensors",
                                                                  "step_0000500.safetensors"]


def test_prune_trusts_a_just_saved_newest_file_without_rereading(tmp_path, trained, monkeypatch):
    paths = saved_steps(tmp_path, trained, [100, 200, 300])
    calls, real = [], ckpt.find_latest_valid
    monkeypatch.setattr(ckpt, "find_latest_valid", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt.prune_checkpoints(tmp_path, keep=2, log=lambda line: None, just_saved=paths[2])
    assert calls == [] and ckpt.list_checkpoints(tmp_path) == paths[1:]
    # not the newest file
    ckpt.prune_checkpoints(tmp_path, keep=1, log=lambda line: None, just_saved=paths[1])
    assert calls == [1] and ckpt.list_checkpoints(tmp_path) == paths[1:]  # re-read; just_saved itself kept


def test_a_run_below_the_newest_checkpoint_sets_the_later_ones_aside(tmp_path, trained):
    """Another timeline's later steps (--ckpt.resume=none, a rollback): moved aside before the run saves, so
    that retention does not delete the run's own saves as the oldest, and no later resume picks the old
    ones."""
    old = saved_steps(tmp_path, trained, [800, 900, 1000])
    logs = []
    assert ckpt.set_aside_after(tmp_path, 1000, logs.append) is None and not logs  # nothing later: no-op
    folder = ckpt.set_aside_after(tmp_path, 500, logs.append)
    assert ckpt.list_checkpoints(tmp_path) == [] and folder.parent == tmp_path
    assert ckpt.list_checkpoints(folder) == [folder / p.name for p in old]  # moved, not deleted
    assert "moved 3 later checkpoint(s) (step_0000800.safetensors .. step_0001000.safetensors)" in logs[0]
    # Without the move, a save of this run would be the oldest file: retention spares it anyway.
    again = saved_steps(tmp_path, trained, [600, 700, 800])
    ckpt.prune_checkpoints(tmp_path, keep=2, log=lambda line: None, just_saved=again[0])
    assert ckpt.list_checkpoints(tmp_path) == again


def test_prune_never_deletes_newest_valid(tmp_path, trained):
    paths = saved_steps(tmp_path, trained, [100, 200, 300, 400, 500])
    corrupt_data_byte(paths[3])
    truncate(paths[4])
    logs = []
    ckpt.prune_checkpoints(tmp_path, keep=2, log=logs.append)
    assert ckpt.list_checkpoints(tmp_path) == paths[2:]
    assert any("keeping step_0000300.safetensors" in line for line in logs)


def test_prune_delete_failure_only_warns(tmp_path, trained, monkeypatch):
    paths = saved_steps(tmp_path, trained, [100, 200, 300])

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    logs = []
    ckpt.prune_checkpoints(tmp_path, keep=1, log=logs.append)
    assert ckpt.list_checkpoints(tmp_path) == paths
    assert sum("warning: could not delete" in line for line in logs) == 2


def test_failed_save_leaves_no_temp_and_previous_intact(tmp_path, trained, monkeypatch):
    (previous,) = saved_steps(tmp_path, trained, [100])
    before = previous.read_bytes()

    def disk_full(tensors, path, metadata, cancelled):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        saved_steps(tmp_path, trained, [200])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000100.safetensors"]
    assert previous.read_bytes() == before
    ckpt.load_checkpoint(previous)


def test_stale_temp_files_are_removed(tmp_path, trained):
    saved_steps(tmp_path, trained, [100])
    # ours, and safetensors' own: its save_file, used by earlier releases, wrote one and renamed it to ours
    for name in (".step_0000200.safetensors.tmp-41", ".step_0000300.safetensors.tmp-42", ".tmpAbc123"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("notes.txt", ".tmp", ".tmpAbc1234", ".tmp-abc12"):
        (tmp_path / name).write_text("not ours")
    assert ckpt.remove_stale_temp_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", ".tmp-abc12", ".tmpAbc1234", "notes.txt",
                                                          "step_0000100.safetensors"]


def test_versions_never_fail():
    found = ckpt.versions()
    assert {"torch", "diffusers", "transformers", "ldm_ddp", "git_commit"} <= found.keys()
    assert all(isinstance(v, str) and v for v in found.values())


def test_describe_groups_and_blocks(tmp_path, trained):
    (path,) = saved_steps(tmp_path, trained, [3])
    described = describe_checkpoint(path, max_rows_per_group=2)
    assert described["groups"]["unet"] == {"tensors": 8,
                                           "params": sum(p.numel() for p in trained[0].parameters()),
                                           "dtypes": ["float32"]}
    rows = {r["name"]: r for r in described["tensors"]}
    assert rows["unet.blocks.1.*"]["tensors"] == 2
    assert rows["optim.conv_in.*.exp_avg_sq"]["tensors"] == 2
    json.dumps(described, allow_nan=False)


def inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/inspect_checkpoint.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
def test_inspect_script(tmp_path, trained, capsys):
    """The command once; then its main() in process (no interpreter start-up)."""
    model, opt = trained
    path = save(tmp_path, 3, model, opt, config={"train": {"max_steps": 10}})
    report = inspect(path)
    assert report.returncode == 0, report.stderr
    for part in ("ldm_ddp/1", "verified", "unet.conv_in.weight", "optim.blocks.0.bias.exp_avg",
                 '"max_steps": 10'):
        assert part in report.stdout
    assert run_main("inspect_checkpoint", path, "--json") == 0
    described = json.loads(capsys.readouterr().out)
    assert described["step"] == 3 and described["groups"]["optim"]["tensors"] == 24
    assert described["metadata"]["optim"][0]["lr"] == 1e-2

    corrupt_data_byte(path)
    assert run_main("inspect_checkpoint", path) == 1
    refused = capsys.readouterr().err.strip()
    assert refused.startswith("step_0000003.safetensors: ") and "\n" not in refused
    assert run_main("inspect_checkpoint", path, "--json", "--no-verify") == 0
    assert json.loads(capsys.readouterr().out)["integrity"] == "not checked"


def test_large_tensors_hashed_in_threads_are_verified(tmp_path):
    # 20 MB: over the thread cut-off
    big = {"unet.big": torch.randn(3_000_000), "unet.big2": torch.randn(2_000_000)}
    path = ckpt.save_checkpoint(tmp_path, 1, big, {})
    assert all(torch.equal(big[k], v) for k, v in ckpt.load_checkpoint(path)[0].items())
    flip(path, path.stat().st_size - 5, 0x01)
    with pytest.raises(CheckpointError, match="tensor unet.big2 digest mismatch"):
        ckpt.load_checkpoint(path)


def test_odd_tensors_round_trip(tmp_path):
    """Non-contiguous, shared-storage, 0-d, empty, bf16, bool and int tensors all save and verify."""
    base = torch.randn(3, 4)
    odd = {"unet.t": base.t(), "ema.t": base, "other.scalar": torch.tensor(2.5),
           "other.empty": torch.zeros(0, 3),
           "other.bf16": torch.randn(5, dtype=torch.bfloat16), "other.mask": torch.tensor([True, False]),
           "other.rng": torch.get_rng_state(), "other.seed": torch.tensor([2**40], dtype=torch.int64)}
    tensors, _ = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 1, odd, {}))
    for name, t in odd.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def test_a_real_write_error_is_an_oserror_and_leaves_no_trace(tmp_path, trained):
    """The file size limit (EFBIG) makes the kernel refuse the write, as a full disk does (ENOSPC):
    save_checkpoint raises the OSError, naming the file, with the previous checkpoint intact."""
    (previous,) = saved_steps(tmp_path, trained, [100])
    before = previous.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))  # Python ignores SIGXFSZ: write fails
    try:
        with pytest.raises(OSError) as err:
            saved_steps(tmp_path, trained, [200])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG and "writing .step_0000200.safetensors.tmp-" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000100.safetensors"]
    assert previous.read_bytes() == before


def test_the_file_is_the_one_safetensors_writes(tmp_path):
    """Every dtype, names out of order: the same header (up to the order of the metadata entries, which
    safetensors leaves to a hash map), padding and tensor bytes as safetensors' own writer."""
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16,
              torch.uint16, torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32,
              torch.complex64, torch.float64, torch.int64, torch.uint64]
    tensors = {f"other.{chr(ord('z') - i)}\u00e9": torch.arange(i + 1).to(dtype).reshape(-1, 1)
               for i, dtype in enumerate(dtypes)}
    tensors.update({"unet.empty": torch.zeros(0, 3), "unet.scalar": torch.tensor(2.5)})
    path = ckpt.save_checkpoint(tmp_path, 1, tensors, {"note": "x"})
    ours = path.read_bytes()
    with safe_open(path, framework="pt") as f:
        theirs = safetensors.torch.save(tensors, metadata=f.metadata())
    n = header_len(path)
    assert ours[:8] == theirs[:8] and ours[n:] == theirs[n:]
    assert json.loads(ours[8:n]) == json.loads(theirs[8:n]) and ours[8:n].rstrip(b" ").endswith(b"}")


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"^step_0000005\.safetensors: unreadable \(") as err:
        ckpt.load_checkpoint(tmp_path / "step_0000005.safetensors")
    assert "\n" not in str(err.value)


def test_describe_lists_each_ema_profile_as_a_group(tmp_path):
    weight = torch.ones(2, 3)
    path = ckpt.save_checkpoint(tmp_path, 1, {"unet.w": weight, "ema.w": weight, "ema_0p9999.w": weight,
                                              "ema_std0p1.w": weight, "misc": weight}, {})
    groups = describe_checkpoint(path)["groups"]
    assert set(groups) == {"unet", "ema", "ema_0p9999", "ema_std0p1", "other"}
    assert all(g["tensors"] == 1 and g["params"] == 6 for g in groups.values())
