"""The YAML search space → Optuna define-by-run function (the only place optuna is imported)."""

from __future__ import annotations

from typing import Any

from fluxtune.config.schema import SearchSpec


class DefineByRun:
    """Optuna define-by-run function over dotted config paths (a class: Tune pickles its searcher's state)."""

    def __init__(self, space: dict[str, Any]):
        self.space = {path: dist.model_dump() for path, dist in space.items()}

    def __call__(self, trial: Any) -> None:
        for path, d in self.space.items():
            if d["type"] == "float":
                trial.suggest_float(path, d["low"], d["high"], log=d["log"], step=d["step"])
            elif d["type"] == "int":
                trial.suggest_int(path, d["low"], d["high"], log=d["log"], step=d["step"])
            else:
                trial.suggest_categorical(path, d["choices"])


def optuna_sampler(spec: SearchSpec):
    import optuna

    seed = spec.sampler.seed
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, spec.num_samples // 2)))


def max_total_steps(base: dict[str, Any], space: dict[str, Any]) -> int:
    """An upper bound on a trial's steps over the space (ASHA's max_t)."""
    def highest(path: str, current: int) -> int:
        dist = space.get(path)
        if dist is None:
            return current
        if dist.type == "categorical":
            numbers = [c for c in dist.choices if isinstance(c, (int, float))]
            return int(max(numbers, default=current))
        return int(dist.high)

    cycles = highest("cycles", base["cycles"])
    return cycles * sum(highest(f"stages.{s['name']}.steps", s["steps"]) for s in base["stages"])
