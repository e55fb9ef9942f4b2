"""Hyperparameter search: an Optuna study whose trials are real training runs.

Each trial is `scripts/train.py` (or `torchrun --nproc_per_node N scripts/train.py`) in its own run folder
`<out>/trial_<number>`, with the search space's values as `--section.key=value` overrides. The tuner reads
the trial's metrics.jsonl as it grows: every validation loss (`val.every`) is reported to Optuna, whose
pruner may stop the trial (SIGTERM: it saves and exits 75). The objective is the trial's last validation
loss (or its best), or the demo checker's "all" score of its last checkpoint.

The study lives in a database (SQLite by default, any URL Optuna takes): several tuners, on one machine or
many, run the same command against one study and share its trials. A tuner that dies (kill -9) leaves its
running trial behind: a tuner started again on the same machine finds it (its tuner's process is gone),
marks it failed and queues its parameters again at once; on other machines its stopped heartbeat does the
same after GRACE_S. A trial's training process gets SIGTERM when its tuner dies (parent-death signal): it
saves and exits, and trains nothing for a tuner that is gone. A retried trial starts in a new folder.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, ConfigError, load_config
from .faults import arm_parent_death_signal
from .metrics import read_records

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("val_loss", "best_val_loss", "demo_all")
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S, GRACE_S = 5, 20  # a trial whose tuner has not beaten for GRACE_S is stale
MAX_CRASHES_IN_A_ROW = 3  # then the tuner stops: a setting every trial fails on would retry forever


class TrialsCrashed(RuntimeError):
    """Trials failed MAX_CRASHES_IN_A_ROW times in a row: scripts/tune.py says so and exits 1."""


@dataclass
class Space:
    """A search-space file: [study] settings, [params] to search and [fixed] overrides of every trial."""
    params: dict[str, dict]
    fixed: dict[str, object] = field(default_factory=dict)
    objective: str = "val_loss"
    pruner: str = "median"
    trials: int = 10
    preset: str = "demo"

    @property
    def direction(self) -> str:
        return "maximize" if self.objective == "demo_all" else "minimize"


def read_space(path: str) -> Space:
    """Parse and check a search-space TOML; ConfigError (one line, naming the key) if anything is wrong."""
    try:
        tree = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"--space {path}: cannot read TOML ({err})") from None
    unknown = set(tree) - {"study", "params", "fixed"}
    if unknown:
        raise ConfigError(f"{path}: unknown section [{sorted(unknown)[0]}] (study, params, fixed)")
    study = tree.get("study", {})
    space = Space(params=tree.get("params", {}), fixed=tree.get("fixed", {}))
    for key, value in study.items():
        if key not in ("objective", "pruner", "trials", "preset"):
            raise ConfigError(f"study.{key}: unknown key (objective, pruner, trials, preset)")
        setattr(space, key, value)
    for key, choices in (("objective", OBJECTIVES), ("pruner", PRUNERS)):
        if getattr(space, key) not in choices:
            raise ConfigError(f"study.{key}: expected {' | '.join(choices)}, got {getattr(space, key)!r}")
    if not isinstance(space.trials, int) or space.trials <= 0:
        raise ConfigError(f"study.trials: expected a positive integer, got {space.trials!r}")
    if not space.params:
        raise ConfigError(f"{path}: no [params] to search")
    for key, spec in space.params.items():
        _check_param(key, spec)
    defaults = load_config(preset=space.preset)  # a preset that is not there fails here, named
    for key in [*space.params, *space.fixed]:
        section, _, name = key.partition(".")
        if not hasattr(defaults, section) or not hasattr(getattr(defaults, section), name):
            raise ConfigError(f"params.{key}: not a config key (--section.key)")
    if space.objective != "demo_all":
        every = space.fixed.get("val.every", defaults.val.every)
        if not every:
            raise ConfigError("fixed.val.every: the objective is a validation loss: set val.every > 0 "
                              "in [fixed]")
    return space


def _check_param(key: str, spec) -> None:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "categorical":
        if not spec.get("choices") or not isinstance(spec["choices"], list):
            raise ConfigError(f"params.{key}.choices: expected a non-empty list")
        return
    if kind not in ("float", "int"):
        raise ConfigError(f"params.{key}.type: expected float | int | categorical, got {kind!r}")
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise ConfigError(f"params.{key}: expected numbers low < high, got low={low!r} high={high!r}")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"params.{key}.low: a log scale needs low > 0, got {low!r}")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"params.{key}: an int parameter needs integer low and high")


def suggest(trial, space: Space) -> dict:
    """The trial's values of every searched key."""
    values = {}
    for key, spec in space.params.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=bool(spec.get("log")))
    return values


def overrides(values: dict) -> list[str]:
    return [f"--{key}={json.dumps(value)}" for key, value in values.items()]


def open_study(storage: str, name: str, space: Space, max_steps: int):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats

    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2),
              "hyperband": optuna.pruners.HyperbandPruner(max_resource=max_steps),
              "none": optuna.pruners.NopPruner()}[space.pruner]
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    for attempt in range(10):  # tuners started together race to create the tables and the study
        try:
            store = RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                               grace_period=GRACE_S,
                               heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            return optuna.create_study(study_name=name, storage=store, direction=space.direction,
                                       pruner=pruner, load_if_exists=True)
        except Exception as err:  # sqlalchemy's IntegrityError, optuna's DuplicatedStudyError: the other won
            if attempt == 9:
                raise
            print(f"storage busy ({type(err).__name__}); trying again", flush=True)
            time.sleep(1 + attempt)


def run_trial(trial, space: Space, out: Path, extra: list[str], nproc: int) -> float:
    """One training run for `trial`; -> its objective. Pruned: optuna.TrialPruned; crashed: RuntimeError."""
    import optuna

    # A retried trial (retry_orphans here, optuna's heartbeat retry elsewhere: both carry the user attributes
    # over) trains on in the folder its dead tuner left, and the run resumes from its newest checkpoint.
    folder = Path(trial.user_attrs.get("run_folder") or out / f"trial_{trial.number:04d}")
    folder.mkdir(parents=True, exist_ok=True)
    wait_until_free(folder)
    values = suggest(trial, space)
    args = ["--preset", space.preset, *overrides(space.fixed), *extra, *overrides(values),
            f"--train.out_dir={folder}", "--log.progress=lines"]
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    log = folder / "train.log"
    trial.set_user_attr("run_folder", str(folder))
    trial.set_user_attr("log", str(log))
    trial.set_user_attr("tuner", f"{socket.gethostname()}:{os.getpid()}")
    start = time.time()
    with open(log, "ab") as sink:
        process = subprocess.Popen([*launcher, str(REPO / "scripts" / "train.py"), *args], cwd=REPO,
                                   stdout=sink, stderr=subprocess.STDOUT, preexec_fn=arm_parent_death_signal)
        reported, pruned = set(), False
        while True:
            running = process.poll() is None
            for step, value in _new_values(folder, reported):
                reported.add(step)
                trial.report(value, step)
                if running and not pruned and trial.should_prune():
                    pruned = True
                    process.send_signal(signal.SIGTERM)  # it saves and exits 75
            if not running:
                break
            time.sleep(0.5)
        code = process.wait()
    trial.set_user_attr("wall_s", round(time.time() - start, 1))
    trial.set_user_attr("exit_code", code)
    if pruned:
        raise optuna.TrialPruned()
    if code != 0:
        raise RuntimeError(f"trial {trial.number}: scripts/train.py exited {code}; see {log}")
    return objective_value(folder, space)


def _new_values(folder: Path, reported: set) -> list[tuple[int, float]]:
    records = read_records(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    return [(r["step"], r["val_loss"]) for r in records
            if "val_loss" in r and r["step"] not in reported and math.isfinite(r["val_loss"])]


def objective_value(folder: Path, space: Space) -> float:
    if space.objective == "demo_all":
        from .checkpoint import list_checkpoints
        last = list_checkpoints(folder / "checkpoints")[-1]
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate_demo.py"), str(last),
                               "--json"], cwd=REPO, capture_output=True, text=True, check=True)
        return float(json.loads(done.stdout.strip().splitlines()[-1])["all"])
    values = [r["val_loss"] for r in read_records(folder / "metrics.jsonl") if "val_loss" in r]
    if not values:
        raise RuntimeError(f"{folder}: no validation loss in metrics.jsonl")
    return min(values) if space.objective == "best_val_loss" else values[-1]


def tune(space: Space, storage: str, name: str, out: Path, extra: list[str], nproc: int) -> None:
    """Run trials until the study holds space.trials finished ones (complete or pruned), shared with any
    other tuner of the same study; then write the results."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg: Config = load_config(overrides=[*overrides(space.fixed), *extra], preset=space.preset)
    study = open_study(storage, name, space, cfg.train.max_steps)
    retry_orphans(study)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    failures = []  # this tuner's trials that crashed in a row

    def stop_after_crashes(study, trial) -> None:
        failures[:] = failures + [trial] if trial.state == TrialState.FAIL else []
        if len(failures) >= MAX_CRASHES_IN_A_ROW:
            study.stop()

    if sum(t.state in done for t in study.trials) < space.trials:
        study.optimize(lambda trial: run_trial(trial, space, out, extra, nproc), catch=(RuntimeError,),
                       callbacks=[MaxTrialsCallback(space.trials, states=done), stop_after_crashes])
    write_results(study, space, out)
    if len(failures) >= MAX_CRASHES_IN_A_ROW:
        last = failures[-1].user_attrs
        raise TrialsCrashed(f"{len(failures)} trials in a row failed (the last exited "
                            f"{last.get('exit_code')}; see {last.get('log')}); the study stops here")


def retry_orphans(study) -> None:
    """Trials left running by a dead tuner of this machine: failed, and their parameters queued again."""
    from optuna.trial import TrialState
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, _, pid = trial.user_attrs.get("tuner", "").rpartition(":")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            folder = trial.user_attrs.get("run_folder", "")
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "run_folder": folder})
            print(f"trial {trial.number}: its tuner (pid {pid}) is gone; failed, its parameters queued again "
                  f"(to resume in {folder})", flush=True)


def wait_until_free(folder: Path, timeout_s: float = 120.0) -> None:
    """Wait while a run holds `folder` (its lock, resume.run_folder_lock): a dead tuner's training process
    saves and stops on its parent's death, which takes seconds. Still held after `timeout_s`: RuntimeError. A
    folder that cannot take a file fails at once (ConfigError), as the run would."""
    from .resume import FolderInUse, run_folder_lock
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with run_folder_lock(folder):
                return
        except FolderInUse as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{folder}: still in use after {timeout_s:.0f} s ({err})") from None
            time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_results(study, space: Space, out: Path) -> None:
    """<out>/trials.md (a table of every trial), best.toml (for scripts/train.py --config) and tune.png."""
    from .tune_report import best_toml, plot, table
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials.md").write_text(table(study))
    print(table(study), flush=True)
    best = best_toml(study, space)
    if best:
        (out / "best.toml").write_text(best)
        print(f"best: trial {study.best_trial.number}, {space.objective} {study.best_value:.5g} -> "
              f"{out / 'best.toml'}", flush=True)
    if plot(study, out / "tune.png"):
        print(f"plot: {out / 'tune.png'}", flush=True)
