"""The tools around training: sample.py, evaluate_demo.py (also on a damaged checkpoint), plot_metrics.py,
wandb offline."""

import json

import numpy as np
from PIL import Image

from test_train import check, metrics


def test_sample_and_evaluate_scripts(tmp_path, trained_run, run_script):
    out = trained_run
    ckpt = out / "checkpoints" / "step_0000002.safetensors"
    prompts = ["--prompt", "a large red circle in the center", "--prompt", "a small blue square in the top left"]
    grids = []
    for name in ("a.png", "b.png"):
        stdout = check(run_script("scripts/sample.py", ckpt, *prompts, "--n", "2", "--steps", "2",
                                  "--out", tmp_path / name, timeout=90))
        assert "4 images" in stdout
        grids.append(np.asarray(Image.open(tmp_path / name)))
    assert grids[0].shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2 x 2 images of 64 px with 2 px padding
    assert np.array_equal(grids[0], grids[1])  # seeded: the same command draws the same images
    assert not np.array_equal(grids[0][2:66, 2:66], grids[0][2:66, 68:132])  # seeds differ within a prompt
    raw = tmp_path / "raw.png"
    check(run_script("scripts/sample.py", ckpt, *prompts, "--n", "2", "--steps", "2", "--weights", "raw",
                     "--out", raw, timeout=90))
    assert not np.array_equal(np.asarray(Image.open(raw)), grids[0])  # EMA and raw weights differ after 2 steps

    result = json.loads(check(run_script("scripts/evaluate_demo.py", ckpt, "--prompts", "64", "--steps", "2",
                                         "--json", timeout=120)).splitlines()[-1])
    assert result["n"] == 64 and result["weights"] == "ema"
    assert all(0.0 <= result[k] <= 1.0 for k in ("colour", "shape", "size", "position", "all"))

    stdout = check(run_script("scripts/plot_metrics.py", out, "--out", tmp_path / "metrics.png", timeout=60))
    with Image.open(tmp_path / "metrics.png") as plot:
        assert "metrics.png" in stdout and plot.size[0] > 500

    # A damaged checkpoint: both tools refuse it with one line naming the file.
    damaged = tmp_path / "damaged" / ckpt.name
    damaged.parent.mkdir()
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for script, extra in (("scripts/sample.py", ["--prompt", "a red circle"]), ("scripts/evaluate_demo.py", [])):
        result = run_script(script, damaged, *extra, timeout=60)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "step_0000002.safetensors" in lines[0], result.stderr


def test_wandb_offline_run_continues_after_restart(tmp_path, tiny_args, run_script):
    out = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_DIR": None, "WANDB_API_KEY": None, "WANDB_SILENT": "true"}
    check(run_script("scripts/train.py", *tiny_args(out, train__max_steps=2, log__wandb="offline"),
                     env=env, timeout=180))
    run_id = (out / "wandb_id.txt").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_id) == 8 and len(runs) == 1 and runs[0].name.endswith(run_id)
    assert any(runs[0].glob("*.wandb"))  # the offline run file, for `wandb sync`
    check(run_script("scripts/train.py", *tiny_args(out, train__max_steps=4, log__wandb="offline"),
                     env=env, timeout=180))
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    assert all(r.name.endswith(run_id) for r in (out / "wandb").glob("offline-run-*"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
