"""What a person reads of a study: a table of its trials, the best configuration as TOML, and a plot."""
from __future__ import annotations

import json
from pathlib import Path


def table(study) -> str:
    """A Markdown table: trial, state, value, each parameter, wall time, exit code."""
    names = sorted({name for t in study.trials for name in t.params})
    lines = ["| trial | state | value | " + " | ".join(names) + " | wall s | exit |",
             "|" + "---|" * (len(names) + 5)]
    for t in study.trials:
        value = f"{t.value:.5g}" if t.value is not None else "-"
        params = [_short(t.params[n]) if n in t.params else "-" for n in names]
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | " + " | ".join(params)
                     + f" | {t.user_attrs.get('wall_s', '-')} | {t.user_attrs.get('exit_code', '-')} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_toml(study, space) -> str:
    """The fixed overrides and the best trial's values, by section: a file for scripts/train.py --config
    (with the study's --preset); "" before any trial completed."""
    from optuna.trial import TrialState
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return ""
    best = study.best_trial
    sections: dict[str, dict] = {}
    for key, value in {**space.fixed, **best.params}.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    head = (f"# best trial {best.number} of study {study.study_name}: {space.objective} = {best.value:.6g}\n"
            f"# python scripts/train.py --preset {space.preset} --config best.toml\n")
    body = "\n".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                     for section, values in sections.items())
    return head + body


def plot(study, path: Path) -> bool:
    """Optimization history (each finished trial's value, the best so far) and parameter importances
    (Optuna's fANOVA, from 2 completed trials on) in one PNG; False without matplotlib or a value."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import optuna
    from optuna.trial import TrialState
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        return False
    fig, (history, importance) = plt.subplots(1, 2, figsize=(11, 4))
    pick = max if study.direction.name == "MAXIMIZE" else min
    best = [pick(t.value for t in done[:i + 1]) for i in range(len(done))]
    history.plot([t.number for t in done], [t.value for t in done], "o", label="trial")
    history.plot([t.number for t in done], best, "-", label="best so far")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
    history.plot([t.number for t in pruned], last, "x", label="pruned (last report)")
    history.set(xlabel="trial", ylabel="objective", title="optimization history")
    history.legend()
    if len(done) >= 2:
        scores = optuna.importance.get_param_importances(study)
        importance.barh(list(scores)[::-1], list(scores.values())[::-1])
    importance.set(xlabel="importance (fANOVA)", title="parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
