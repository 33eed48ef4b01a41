"""The YAML search space → Optuna define-by-run function and sampler, and the sweep's durable study (opened, counted,
its abandoned trials failed)."""

from __future__ import annotations

from typing import Any

from fluxtune.config.errors import InputError, Problem
from fluxtune.config.paths import get_path
from fluxtune.config.schedule import planned_steps
from fluxtune.config.schema import Condition, SearchSpec


class DefineByRun:
    """Optuna define-by-run function over dotted config paths (a class: Tune pickles its searcher's state).

    Keys are sampled in file order; a key with `when` is sampled only if its conditions hold for the values
    sampled so far (or the base value of an unsearched key), so e.g. merge settings exist only when cycles > 1.
    """

    def __init__(self, space: dict[str, Any], base: dict[str, Any]):
        self.space = {path: dist.model_dump(exclude={"when"}) for path, dist in space.items()}
        self.when = {path: {k: c.model_dump(by_alias=True, exclude_unset=True) for k, c in dist.when.items()}
                     for path, dist in space.items()}
        self.base = base

    def active(self, path: str, sampled: dict[str, Any]) -> bool:
        for key, condition in self.when[path].items():
            value = sampled[key] if key in sampled else get_path(self.base, key)
            if not Condition.model_validate(condition).holds(value):
                return False
        return True

    def __call__(self, trial: Any) -> None:
        sampled: dict[str, Any] = {}
        for path, d in self.space.items():
            if not self.active(path, sampled):
                continue
            if d["type"] == "float":
                sampled[path] = trial.suggest_float(path, d["low"], d["high"], log=d["log"], step=d["step"])
            elif d["type"] == "int":
                sampled[path] = trial.suggest_int(path, d["low"], d["high"], log=d["log"], step=d["step"])
            else:
                sampled[path] = trial.suggest_categorical(path, d["choices"])


def grid_values(spec: SearchSpec) -> dict[str, list[Any]]:
    """Every value of every key, for the grid sampler: categoricals, ints, and floats with a step."""
    grid: dict[str, list[Any]] = {}
    problems = []
    for path, dist in spec.space.items():
        if dist.type == "categorical":
            grid[path] = list(dist.choices)
        elif dist.type == "int" and not dist.log:
            grid[path] = list(range(dist.low, dist.high + 1, dist.step))
        elif dist.type == "float" and dist.step:
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[path] = [round(dist.low + i * dist.step, 12) for i in range(count)]
        else:
            problems.append(Problem("", "the grid sampler needs categorical choices, a linear int range or a "
                                    "float step", key=f"search.space.{path}"))
    if problems:
        raise InputError(problems)
    return grid


def grid_size(spec: SearchSpec) -> int:
    size = 1
    for values in grid_values(spec).values():
        size *= len(values)
    return size


def optuna_sampler(spec: SearchSpec, seed_offset: int = 0):
    """The configured sampler; `seed_offset` (the trials already in the study) keeps an extension from
    replaying the first run's random draws."""
    import optuna

    kind = spec.sampler.type
    seed = None if spec.sampler.seed is None else spec.sampler.seed + seed_offset
    startup = spec.sampler.startup_trials or min(10, max(1, spec.num_samples // 2))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler(grid_values(spec), seed=seed)
    if kind == "cmaes":
        # CMA-ES models floats and ints; categoricals and conditional keys fall back to random sampling.
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def sample_configs(spec: SearchSpec, base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`n` configurations the sampler would propose first (a throw-away in-memory study; nothing trains)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna_sampler(spec), direction="minimize" if spec.mode == "min" else "maximize")
    space = DefineByRun(spec.space, base)
    out = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        out.append(dict(trial.params))
    return out


def max_total_steps(base: dict[str, Any], space: dict[str, Any]) -> int:
    """An upper bound on a trial's steps over the space (ASHA's max_t): every corner of the numeric keys."""
    from fluxtune.config.paths import corner_trees

    keys = [k for k in space if k == "cycles" or k == "schedule" or k.endswith(".steps") or ".steps." in k]
    best = planned_steps(base)
    for tree in corner_trees(base, space, keys):
        try:
            best = max(best, planned_steps(tree))
        except (KeyError, TypeError, IndexError):
            continue
    return best


def optuna_storage_url(tracking_uri: str, runs_root: str) -> str:
    """The study's durable home: `optuna.db` beside a local MLflow store, else under the runs folder."""
    from pathlib import Path

    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path(runs_root) / 'optuna.db'}"


def optuna_storage(url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(url)


class StudyUnreadable(RuntimeError):
    """The sweep's Optuna study cannot be opened or read (one line: which study, where, why)."""


def load_study(url: str, study_name: str):
    """The sweep's durable study; StudyUnreadable when it is missing or its database is damaged."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=optuna_storage(url))
    except Exception as exc:  # optuna raises KeyError, sqlalchemy's errors, ValueError…: all mean the same here
        raise StudyUnreadable(f"the Optuna study {study_name!r} in {url} cannot be read: "
                              f"{type(exc).__name__}: {exc}") from exc


def study_summary(url: str, study_name: str) -> dict[str, int]:
    """Trial counts by state in the durable study (shown in the summary; tests check no trial ran twice)."""
    study = load_study(url, study_name)
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def fail_abandoned(url: str, study_name: str) -> int:
    """Mark the study's trials still RUNNING as FAIL: at the end of a finished sweep nothing resumes them (an
    errored trial, or one whose driver died). Returns how many."""
    import optuna

    study = load_study(url, study_name)
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(running)
