"""`fluxtune search`: Optuna (through Tune) samples the space, one Train worker group per trial, MLflow listens."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from fluxtune import __version__
from fluxtune.config.load import sample_experiment
from fluxtune.config.schema import SearchFile, SearchSpec
from fluxtune.plugins import plugin_set
from fluxtune.registry import registry
from fluxtune.search.callbacks import ConsoleProgress, MlflowSweepCallback, TrialLog
from fluxtune.search.space import DefineByRun, max_total_steps, optuna_sampler
from fluxtune.tracking.registry import register_adapter
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.store import tracking_uri
from fluxtune.train.cluster import local_cpus, start_ray
from fluxtune.train.trial import TrialSettings, trainable


@dataclass
class SweepOutcome:
    sweep_id: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_trial: str | None = None
    best_config: dict[str, Any] = field(default_factory=dict)
    best_metric: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    storage_path: str = ""


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _scheduler(search: SearchSpec, base: dict[str, Any]):
    if search.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="global_step", metric=search.metric, mode=search.mode,
                         grace_period=search.scheduler.grace_period,
                         reduction_factor=search.scheduler.reduction_factor,
                         max_t=max(max_total_steps(base, search.space), search.scheduler.grace_period + 1))


def run_sweep(spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None = None,
              console: Console | None = None, address: str | None = None, verbose: bool = False) -> SweepOutcome:
    console = console or Console()
    search = spec.search or SearchSpec(num_samples=1, max_concurrent=1)
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(spec.storage_path or "runs").resolve() / sweep_id
    uri = tracking_uri(spec.tracking.uri)
    experiment_name = spec.tracking.experiment or spec.name
    plugins = plugin_set()

    tracker = SweepTracker(uri, experiment_name, sweep_id)
    parent = tracker.start(spec_path, tags={"fluxtune.version": __version__, "fluxtune.git_revision": _git_revision(),
                                            **{f"fluxtune.plugin.{k}": v for k, v in plugins.items()}},
                           params={"search": search.model_dump(mode="json"), "base": base})
    console.print(f"sweep [bold]{sweep_id}[/]: MLflow experiment {experiment_name!r} at {uri}, run {parent}")

    start_ray(address, local_cpus(base["workers"], base["cpus_per_worker"], search.max_concurrent), verbose)
    settings = TrialSettings(sweep_id=sweep_id, base=base, jsonl=jsonl, storage_path=str(storage), plugins=plugins)
    reg = registry()
    mlflow_callback = MlflowSweepCallback(tracker, plugins, lambda config: sample_experiment(base, config, reg))
    searcher = None
    if search.space:
        searcher = ConcurrencyLimiter(OptunaSearch(space=DefineByRun(search.space), metric=search.metric, mode=search.mode,
                                                   sampler=optuna_sampler(search)),
                                      max_concurrent=search.max_concurrent)
    tuner = tune.Tuner(
        trainable(settings),
        # metric/mode live on the searcher and scheduler: a define-by-run OptunaSearch ignores Tune's
        tune_config=tune.TuneConfig(search_alg=searcher,
                                    scheduler=_scheduler(search, base), num_samples=search.num_samples,
                                    max_concurrent_trials=None if searcher else search.max_concurrent),
        run_config=tune.RunConfig(name=sweep_id, storage_path=str(storage / "tune"), verbose=0,
                                  callbacks=[mlflow_callback, ConsoleProgress(search.metric, console)]),
    )
    results = tuner.fit()

    outcome = SweepOutcome(sweep_id=sweep_id, tracking_uri=uri, experiment=experiment_name, parent_run_id=parent,
                           storage_path=str(storage))
    for result in results:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        outcome.trials.append({"trial": trial_id, "config": result.config, "error": str(result.error or ""),
                               search.metric: (result.metrics or {}).get(search.metric)})
    finished = [t for t in outcome.trials if t[search.metric] is not None and not t["error"]]
    if finished:
        pick = min if search.mode == "min" else max
        best = pick(finished, key=lambda t: t[search.metric])
        outcome.best_trial, outcome.best_config, outcome.best_metric = best["trial"], best["config"], best[search.metric]
        model_name = spec.tracking.register_as or spec.name
        log = mlflow_callback.trials.get(best["trial"])
        if log is not None and log.stages:
            outcome.model_name = model_name
            outcome.model_version = _register_best(tracker, best["trial"], log, model_name, spec.tracking.alias,
                                                   search.metric, best[search.metric], sweep_id)
    tracker.finish("FINISHED" if finished else "FAILED",
                   {f"best_{search.metric}": outcome.best_metric} if outcome.best_metric is not None else {},
                   {"fluxtune.best_trial": str(outcome.best_trial)})
    return outcome


def _register_best(tracker: SweepTracker, trial_id: str, log: TrialLog, model_name: str, alias: str,
                   metric: str, value: float, sweep_id: str) -> str:
    """Register the trial's last adapter on top of the transformer it was trained on."""
    stages = log.stages
    adapter_at = next((i for i in range(len(stages) - 1, -1, -1)
                       if (Path(stages[i].checkpoint) / "exports" / "adapter").is_dir()), None)
    if adapter_at is None:  # no adapter stage: the final transformer is the model
        final = stages[-1]
        adapter_dir, base_dir, record = None, Path(final.checkpoint) / "transformer", final
    else:
        record = stages[adapter_at]
        adapter_dir = Path(record.checkpoint) / "exports" / "adapter"
        base_dir = Path(stages[adapter_at - 1].checkpoint) / "transformer" if adapter_at > 0 else None
    tags = {"sweep": sweep_id, "trial": trial_id, "cycle": record.cycle, "stage": record.stage, metric: value,
            "base_model": str(log.params["model"].get("path") or log.params["model"].get("preset"))}
    return register_adapter(tracker.uri, tracker.trial_runs[trial_id], model_name, alias, adapter_dir, base_dir,
                            log.params["model"], tags)
