"""scripts/tune.py: the search-space file's errors, a study of real tiny runs with pruning, a tuner killed
with kill -9 and started again, and two tuners sharing one SQLite study."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, script_env

from ldm_ddp.config import ConfigError

optuna = pytest.importorskip("optuna")

SPACE = """
[study]
objective = "val_loss"
pruner = "median"
trials = {trials}

[params]
"optim.lr" = {{ type = "float", low = 1e-4, high = 1e-2, log = true }}

[fixed]
"train.max_steps" = {steps}
"val.every" = 2
"val.num_samples" = 8
"ckpt.every" = 100
"""


@pytest.mark.parametrize("text, error", [
    ("[params]\n", "no [params] to search"),
    ('[params]\n"optim.lr" = { type = "float", low = 1.0, high = 0.5 }',
     "params.optim.lr: expected numbers low < high"),
    ('[params]\n"optim.lr" = { type = "float", low = 0.0, high = 0.5, log = true }',
     "params.optim.lr.low: a log"),
    ('[params]\n"optim.lr" = { type = "normal" }',
     "params.optim.lr.type: expected float | int | categorical"),
    ('[params]\n"optim.nope" = { type = "float", low = 0.1, high = 0.5 }',
     "params.optim.nope: not a config key"),
    ('[params]\n"ema.decay" = { type = "categorical", choices = [] }', "params.ema.decay.choices: expected"),
    ('[study]\npruner = "sometimes"\n[params]\n"optim.lr" = { type = "float", low = 0.1, high = 0.5 }',
     "study.pruner: expected median | hyperband | none"),
    ('[search]\n', "unknown section [search]"),
    ('[params]\n"optim.lr" = { type = "float", low = 0.1, high = 0.5 }', "fixed.val.every: the objective"),
    ("[params\n", "cannot read TOML"),
])
def test_a_bad_space_file_fails_in_one_line_naming_the_key(tmp_path, text, error):
    from ldm_ddp.tune import read_space
    (tmp_path / "space.toml").write_text(text)
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("|", r"\|")) as raised:
        read_space(str(tmp_path / "space.toml"))
    assert "\n" not in str(raised.value)


def tuner(tmp_path, tiny_args, trials, steps, name="study", out="out", **popen):
    """The tuner command on a tiny space (trials of `steps` steps), as a process."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE.format(trials=trials, steps=steps))
    extra = [a for a in tiny_args(tmp_path / "unused")
             if not a.startswith(("--train.max_steps", "--ckpt.every"))]
    command = [sys.executable, "scripts/tune.py", "--space", str(space), "--study", name, "--out",
               str(tmp_path / out), "--storage", f"sqlite:///{tmp_path / 'study.db'}", *extra]
    return subprocess.Popen(command, cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def load(tmp_path, name="study"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.slow
def test_a_three_trial_study_prunes_the_bad_trial_and_writes_its_results(tmp_path, tiny_args):
    study = optuna.create_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study.db'}")
    for lr in (3e-3, 2e-3, 1e-9):  # the third learns nothing: worse than the median at its first report
        study.enqueue_trial({"optim.lr": lr})
    done = tuner(tmp_path, tiny_args, trials=3, steps=40)  # long enough to be running when pruned
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"], output
    assert trials[2].user_attrs["exit_code"] == 75  # SIGTERM: saved and exited as preempted
    assert trials[2].intermediate_values and max(trials[2].intermediate_values) < 40
    assert (tmp_path / "out" / "trial_0002" / "checkpoints").is_dir()
    best = min(trials[:2], key=lambda t: t.value)
    toml = (tmp_path / "out" / "best.toml").read_text()
    assert f"lr = {best.params['optim.lr']}" in toml and "max_steps = 40" in toml
    assert "| 2 | pruned |" in (tmp_path / "out" / "trials.md").read_text()
    assert (tmp_path / "out" / "tune.png").stat().st_size > 10_000
    from ldm_ddp.config import load_config
    cfg = load_config(str(tmp_path / "out" / "best.toml"))
    assert cfg.optim.lr == best.params["optim.lr"] and cfg.val.every == 2


@pytest.mark.slow
def test_a_tuner_killed_with_kill9_is_started_again_and_retries_its_trial(tmp_path, tiny_args):
    first = tuner(tmp_path, tiny_args, trials=2, steps=400)
    log = tmp_path / "out" / "trial_0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while not log.exists() and time.time() < deadline:  # the first trial is training
        time.sleep(0.5)
    assert log.exists(), first.communicate(timeout=5)[0] if first.poll() is not None else "no metrics"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    # Its training process got SIGTERM with its parent's death: it saves and stops (no orphan trains on)
    deadline = time.time() + 30
    while not list((tmp_path / "out" / "trial_0000" / "checkpoints").glob("step_*.safetensors")):
        assert time.time() < deadline, "the orphaned trial did not save and stop"
        time.sleep(0.5)
    saved = int(sorted((tmp_path / "out" / "trial_0000" / "checkpoints").glob("step_*.safetensors"))[-1]
                .stem.split("_")[1])
    killed = load(tmp_path).trials[0]
    assert killed.state.name == "RUNNING"
    again = tuner(tmp_path, tiny_args, trials=2, steps=4)  # shorter trials now, the same study
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert "trial 0: its tuner" in output
    trials = load(tmp_path).trials
    assert trials[0].state.name == "FAIL"
    retried = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retried) == 1 and retried[0].params == killed.params and retried[0].state.name == "COMPLETE"
    # the retry trained on in the killed trial's folder, from the checkpoint its training process saved
    assert retried[0].user_attrs["run_folder"] == killed.user_attrs["run_folder"]
    resumes = (tmp_path / "out" / "trial_0000" / "resumes.jsonl").read_text().splitlines()
    resumes = [json.loads(x) for x in resumes]
    assert [r["step"] for r in resumes] == [saved]
    assert set(retried[0].intermediate_values) >= {s for s in killed.intermediate_values if s <= saved}
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    assert not any(t.state.name == "RUNNING" for t in trials)


@pytest.mark.slow
def test_two_tuners_share_one_sqlite_study_without_duplicate_trials(tmp_path, tiny_args):
    tuners = [tuner(tmp_path, tiny_args, trials=4, steps=4, out="shared") for _ in range(2)]
    outputs = [t.communicate(timeout=400)[0] for t in tuners]
    assert [t.returncode for t in tuners] == [0, 0], outputs
    trials = load(tmp_path).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]  # what study.trials counts
    assert len(finished) >= 4 and len({t.number for t in trials}) == len(trials), (trials, outputs)
    assert not any(t.state.name in ("RUNNING", "FAIL") for t in trials)
    owners = {t.user_attrs["tuner"] for t in finished}
    assert len(owners) == 2  # both tuners ran trials
    folders = [t.user_attrs["run_folder"] for t in trials]
    assert len(set(folders)) == len(folders)  # one folder per trial, none trained twice


@pytest.mark.slow
def test_crashing_trials_are_failed_with_their_exit_code_and_log_and_the_tuner_stops(tmp_path, tiny_args):
    """A setting every trial fails on (here a batch of 0: a config error, exit 2): each trial is failed with
    its exit code and log, and after three in a row the tuner stops in one line (exit 1) instead of retrying
    forever."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE.format(trials=2, steps=4).replace(
        "[fixed]", '"data.batch_per_gpu" = { type = "categorical", choices = [0] }\n\n[fixed]'))
    command = [sys.executable, "scripts/tune.py", "--space", str(space), "--study", "study", "--out",
               str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path / 'study.db'}"]
    result = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 trials in a row failed (the last exited 2; see" in result.stderr
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    assert all(t.user_attrs["exit_code"] == 2 for t in trials)
    assert "data.batch_per_gpu" in open(trials[0].user_attrs["log"]).read()


@pytest.mark.slow
def test_a_trial_under_torchrun_scored_by_the_demo_checker(tmp_path, tiny_args):
    """--nproc 2: the trial is torchrun with two ranks; objective demo_all: the checker's "all" score of the
    trial's last checkpoint, maximized."""
    space = tmp_path / "space.toml"
    text = SPACE.format(trials=1, steps=2).replace('objective = "val_loss"', 'objective = "demo_all"')
    space.write_text(text.replace('"val.every" = 2', '"val.every" = 0'))
    extra = [a for a in tiny_args(tmp_path / "unused", data__batch_per_gpu=1)
             if not a.startswith(("--train.max_steps", "--ckpt.every"))]
    command = [sys.executable, "scripts/tune.py", "--space", str(space), "--out", str(tmp_path / "out"),
               "--nproc", "2", *extra]
    result = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    (trial,) = study.trials
    assert trial.state.name == "COMPLETE" and 0 <= trial.value <= 1 and study.direction.name == "MAXIMIZE"
    from ldm_ddp.checkpoint import list_checkpoints, load_checkpoint
    _, meta = load_checkpoint(list_checkpoints(tmp_path / "out" / "trial_0000" / "checkpoints")[-1])
    assert meta["world_size"] == 2 and meta["step"] == 2


def test_a_retry_waits_for_the_folder_and_gives_up_on_one_still_held(tmp_path):
    """The dead tuner's training process may still be saving in the folder a retry resumes in: the retry waits
    for its lock (another process's POSIX lock) and fails in one line if it is held past the timeout."""
    from ldm_ddp.tune import wait_until_free
    folder = tmp_path / "trial_0000"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(folder / '.lock')!r}, 'a+')\n"
        "fcntl.lockf(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[1]))\n"), "2.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match="trial_0000: still in use after 1 s"):
        wait_until_free(folder, timeout_s=1.0)
    start = time.monotonic()
    wait_until_free(folder, timeout_s=30.0)  # the holder lets go within 2.5 s of its start
    assert time.monotonic() - start < 5 and holder.wait(5) == 0
