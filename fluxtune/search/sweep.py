"""`fluxtune search`: Optuna (through Tune) samples the space, one Train worker group per trial, MLflow listens.

A sweep lives in `runs/<sweep>/` (sweep.json, Tune and Train folders, the stage cache, best.yaml) and its Optuna
study in durable storage beside the MLflow store, so an interrupted sweep resumes (`Tuner.restore`: finished
trials stay finished, unfinished ones continue from their last stage checkpoint) and a finished one is
extended (`--more N`: a new Tune run on the same study, so the sampler learns from every earlier trial).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from fluxtune import __version__
from fluxtune import storage
from fluxtune.config.load import sample_experiment
from fluxtune.config.paths import set_path
from fluxtune.config.schedule import planned_steps
from fluxtune.config.schema import SearchFile, SearchSpec
from fluxtune import failures
from fluxtune.failures import keep_errors_in, quiet_trial_tracebacks
from fluxtune.plugins import plugin_set
from fluxtune.registry import registry
from fluxtune.search.best import stage_records, write_best_yaml
from fluxtune.search.callbacks import StopFinishedRuns, CHECKPOINT_KEY, ConsoleProgress, MlflowSweepCallback
from fluxtune.search.record import SweepRecord, fingerprint
from fluxtune.search.space import (DefineByRun, max_total_steps, optuna_sampler, optuna_storage,
                                   optuna_storage_url, study_summary)
from fluxtune.tracking.registry import register_adapter, resolve_registered_model
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.store import tracking_uri
from fluxtune.train.stops import create_board
from fluxtune.train.cluster import check_resources, local_cpus, start_ray
from fluxtune.train.datasets import prepare_sweep_data
from fluxtune.train.trial import TrialSettings, record_stage, trainable

RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker")


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
    best_yaml: str | None = None
    optuna_storage: str = ""
    study_counts: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def trained_steps(self) -> int:
        return sum(t["steps"] - t["reused_steps"] for t in self.trials)


class StageCacheRecorder(tune.Callback):
    """Offers every finished stage checkpoint to later trials (stage reuse), keyed by content hash."""

    def __init__(self, settings: TrialSettings):
        self.settings = settings

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("stage_end") and result.get(CHECKPOINT_KEY):
            experiment = sample_experiment(self.settings.base, trial.config, registry())
            checkpoint = storage.qualify(result[CHECKPOINT_KEY], self.settings.storage_path)
            record_stage(self.settings, experiment, int(result["cycle"]), result["stage"], checkpoint,
                         trial.trial_id, int(result.get("global_step", 0)))


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _scheduler(search: SearchSpec, base: dict[str, Any]):
    kind = search.scheduler
    if kind.type == "fifo":
        return FIFOScheduler()
    if kind.type == "median":
        return MedianStoppingRule(time_attr="global_step", metric=search.metric, mode=search.mode,
                                  grace_period=kind.grace_period, min_samples_required=kind.min_samples)
    return ASHAScheduler(time_attr="global_step", metric=search.metric, mode=search.mode,
                         grace_period=kind.grace_period, reduction_factor=kind.reduction_factor,
                         max_t=max(max_total_steps(base, search.space), kind.grace_period + 1))


def _resource_corners(base: dict[str, Any], search: SearchSpec) -> list[dict[str, Any]]:
    """The base with every combination of the extreme searched resource values (workers, CPUs, GPUs)."""
    keys = [k for k in RESOURCE_KEYS if k in search.space]
    values = [list(search.space[k].choices) if search.space[k].type == "categorical"
              else [search.space[k].low, search.space[k].high] for k in keys]
    out = []
    for combo in itertools.product(*values):
        tree = base
        for key, value in zip(keys, combo):
            tree = set_path(tree, key, value)
        out.append(tree)
    return out


def _searcher(search: SearchSpec, base: dict[str, Any], storage_url: str, study: str, earlier_trials: int):
    if not search.space:
        return None
    optuna = OptunaSearch(space=DefineByRun(search.space, base), metric=search.metric, mode=search.mode,
                          sampler=optuna_sampler(search, seed_offset=earlier_trials), study_name=study,
                          storage=optuna_storage(storage_url))
    return ConcurrencyLimiter(optuna, max_concurrent=search.max_concurrent)


def run_sweep(spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None = None,
              console: Console | None = None, address: str | None = None, verbose: bool = False,
              resume: bool = False, more: int = 0) -> SweepOutcome:
    console = console or Console()
    spec_file = spec_path or "<spec>"
    search = spec.search or SearchSpec(num_samples=1, max_concurrent=1)
    # The sweep record, best.yaml and model downloads stay on the driver's disk; with a URI `storage_path` the
    # trials' checkpoints and the stage-reuse index go there instead, where every node of a cluster reaches them.
    shared_root = spec.storage_path if spec.storage_path and storage.is_uri(spec.storage_path) else None
    root = Path(spec.storage_path if shared_root is None and spec.storage_path else "runs").resolve()
    fp = fingerprint(spec, base)
    if resume or more:
        record = SweepRecord.to_continue(root, spec.name, finished=bool(more), fp=fp, spec_file=spec_file)
    else:
        record = SweepRecord.new(root, spec.name, fp)
    folder = Path(record.folder)
    keep_errors_in(folder)  # an unexpected error from here on keeps its traceback in the sweep folder
    trial_storage = storage.join(shared_root, record.sweep_id) if shared_root else str(folder)

    local_ray = start_ray(address, local_cpus(base["workers"], base["cpus_per_worker"], search.max_concurrent), verbose)
    stop_board = create_board(record.sweep_id)  # held for the whole sweep: workers look it up by name
    check_resources(_resource_corners(base, search), spec_file)  # before anything is written

    uri = tracking_uri(spec.tracking.uri)
    base = {**base, "model": resolve_registered_model(base["model"], uri, folder)}  # models:/… → a local folder
    experiment_name = spec.tracking.experiment or spec.name
    plugins = plugin_set()
    record.optuna_storage = record.optuna_storage or optuna_storage_url(uri, str(root))
    record.status = "running"
    if local_ray is not None:  # where its logs are, and which session to look for if the driver is killed
        record.ray_sessions.append(local_ray.describe())
    record.save()
    tracker = SweepTracker(uri, experiment_name, record.sweep_id, upload_checkpoints=spec.tracking.upload_checkpoints,
                           spill_dir=Path(record.folder))  # MLflow outages: unlogged writes wait in the sweep folder
    parent = tracker.start(spec_path, tags={"fluxtune.version": __version__, "fluxtune.git_revision": _git_revision(),
                                            **{f"fluxtune.plugin.{k}": v for k, v in plugins.items()}},
                           params={"search": search.model_dump(mode="json"), "base": base})
    how = "resumed" if resume else (f"extended by {more} trials" if more else "started")
    console.print(f"sweep [bold]{record.sweep_id}[/] {how}: MLflow experiment {experiment_name!r} at {uri}, "
                  f"run {parent}")

    # Rows checked again; the latent cache (one per searched data-key combination) built once, before any trial.
    prepared = prepare_sweep_data(jsonl, base, space=search.space)
    if not (resume or more):
        tracker.log_sweep_params(prepared.mlflow_params())
    console.print(f"data: {prepared.summary()}")
    settings = TrialSettings(sweep_id=record.sweep_id, base=base, jsonl=prepared.source, storage_path=trial_storage,
                             plugins=plugins, reuse_stages=search.reuse_stages, max_failures=search.max_failures)
    reg = registry()
    callbacks = [MlflowSweepCallback(tracker, plugins, lambda config: sample_experiment(base, config, reg),
                                     trial_storage, scheduler=search.scheduler.type, sweep_folder=str(folder)),
                 StageCacheRecorder(settings), StopFinishedRuns(record.sweep_id),
                 ConsoleProgress(search.metric, console, search.mode, more or search.num_samples, search.scheduler.type,
                                 lambda config: planned_steps(sample_experiment(base, config, reg)),
                                 sweep_folder=str(folder))]

    if resume:
        tune_dir = storage.join(trial_storage, "tune", record.tune_runs[-1])
        tuner = tune.Tuner.restore(tune_dir, trainable(settings), resume_unfinished=True, resume_errored=True)
        # The pickled callbacks hold the old process's tracker and console: use this process's.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tune_name = "tune" if not record.tune_runs else f"more-{len(record.tune_runs)}"
        record.tune_runs.append(tune_name)
        record.expected[tune_name] = more or search.num_samples
        record.save()
        searcher = _searcher(search, base, record.optuna_storage, record.sweep_id, len(record.trials))
        tuner = tune.Tuner(
            trainable(settings),
            # metric/mode live on the searcher and scheduler: a define-by-run OptunaSearch ignores Tune's
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(search, base),
                                        num_samples=more or search.num_samples,
                                        max_concurrent_trials=None if searcher else search.max_concurrent),
            run_config=tune.RunConfig(name=tune_name, storage_path=storage.join(trial_storage, "tune"), verbose=0,
                                      callbacks=callbacks),
        )
    # Tune's per-trial result.json/progress.csv loggers are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): the results
    # come from memory and the driver's MLflow callback, so its "could not fetch metrics" warning is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if not verbose:  # a failed trial is one console line naming where its full error is kept, not Tune's traceback
        quiet_trial_tracebacks()
    handler_before = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()
        for result in results:
            row = _trial_row(result, search.metric, settings, base)
            if row is not None:
                record.trials[row["trial"]] = row
    except BaseException:  # Ctrl+C twice, or a bug: the record must still say the sweep can be resumed
        record.status = "interrupted"
        record.save()
        raise
    # Tune returns normally after Ctrl+C (it saves its state first): unfinished or missing trials tell.
    interrupted = (_interrupted_by_user(handler_before)
                   or results.num_terminated + results.num_errors < len(results)
                   or len(results) < record.expected.get(record.tune_runs[-1], len(results)))
    record.status = "interrupted" if interrupted else "finished"
    record.save()

    outcome = SweepOutcome(sweep_id=record.sweep_id, tracking_uri=uri, experiment=experiment_name,
                           parent_run_id=parent, storage_path=trial_storage, optuna_storage=record.optuna_storage,
                           trials=list(record.trials.values()), interrupted=interrupted)
    if search.space and record.trials:
        outcome.study_counts = study_summary(record.optuna_storage, record.sweep_id)
    finished = [t for t in outcome.trials if t[search.metric] is not None and not t["error"]]
    if finished:
        pick = min if search.mode == "min" else max
        best = pick(finished, key=lambda t: t[search.metric])
        outcome.best_trial, outcome.best_config, outcome.best_metric = best["trial"], best["config"], best[search.metric]
        best_experiment = sample_experiment(base, best["config"], reg)
        outcome.best_yaml = str(write_best_yaml(folder / "best.yaml", spec, best_experiment, record.sweep_id,
                                                best["trial"], search.metric, best[search.metric]))
        stages = stage_records(trial_storage, record.sweep_id, best["trial"])
        if stages and best["trial"] in record.registered:  # an extension that found no better trial
            outcome.model_name, outcome.model_version = record.registered[best["trial"]]
        elif stages and not tracker.flush():  # MLflow is down: a later --more registers the best trial
            console.print(f"[yellow]warning[/]: MLflow at {uri} is unreachable: trial {best['trial']} is not "
                          "registered")
        elif stages:
            outcome.model_name = spec.tracking.register_as or spec.name
            outcome.model_version = _register_best(tracker, best["trial"], stages, best_experiment,
                                                   outcome.model_name, spec.tracking.alias, search.metric,
                                                   best[search.metric], record.sweep_id)
            record.registered[best["trial"]] = [outcome.model_name, outcome.model_version]
            record.save()
        ranked = sorted(finished, key=lambda t: t[search.metric], reverse=search.mode == "max")
        for other in ranked[1:spec.tracking.register_top]:  # the runners-up: versions without an alias
            other_stages = stage_records(trial_storage, record.sweep_id, other["trial"])
            if other_stages and other["trial"] not in record.registered and tracker.flush():
                name = spec.tracking.register_as or spec.name
                record.registered[other["trial"]] = [name, _register_best(
                    tracker, other["trial"], other_stages, sample_experiment(base, other["config"], reg), name, None,
                    search.metric, other[search.metric], record.sweep_id)]
                record.save()
    tracker.finish("KILLED" if interrupted else ("FINISHED" if finished else "FAILED"),
                   {f"best_{search.metric}": outcome.best_metric} if outcome.best_metric is not None else {},
                   {"fluxtune.best_trial": str(outcome.best_trial), "fluxtune.best_yaml": str(outcome.best_yaml)})
    return outcome


def _interrupted_by_user(handler_before: Any) -> bool:
    """Tune swaps in its own SIGINT handler for a run and puts the previous one back only when Ctrl+C arrives
    (then it returns normally, in-flight trials marked as ended): finding the old handler means interrupted."""
    now = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, handler_before)
    tune_handles_sigint = (threading.current_thread() is threading.main_thread()
                           and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))
    return tune_handles_sigint and now is handler_before


def _trial_row(result: Any, metric: str, settings: TrialSettings, base: dict[str, Any]) -> dict[str, Any] | None:
    if result.config is None and result.error is None:  # Ctrl+C before its first report: --resume reruns it
        return None
    config = result.config or {}  # a trial that failed before its first report has no recorded config
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if trial_id is None:  # failed before its first report
        trial_id = Path(result.path).name if result.path else None
    if trial_id is None:
        return None
    used = storage.read_json(settings.used_record(trial_id))
    reused = int(used["global_step"]) if used else 0
    experiment = sample_experiment(base, config, registry())
    error = failures.redact_text(str(result.error or ""))[:2000]  # the full text is in errors/trial-<id>.txt
    return {"trial": trial_id, "config": config, "error": error,
            metric: metrics.get(metric), "steps": int(metrics.get("global_step", 0)), "reused_steps": reused,
            "planned_steps": planned_steps(experiment)}


def _register_best(tracker: SweepTracker, trial_id: str, stages: list[Any], experiment: dict[str, Any],
                   model_name: str, alias: str | None, metric: str, value: float, sweep_id: str) -> str:
    """Register the trial's last adapter on top of the transformer it was trained on."""
    adapter_at = next((i for i in range(len(stages) - 1, -1, -1)
                       if storage.exists(storage.join(stages[i].checkpoint, "exports", "adapter"))), None)
    if adapter_at is None:  # no adapter stage: the final transformer is the model
        record, adapter_dir, base_dir = stages[-1], None, storage.join(stages[-1].checkpoint, "transformer")
    else:
        record = stages[adapter_at]
        adapter_dir = storage.join(record.checkpoint, "exports", "adapter")
        base_dir = storage.join(stages[adapter_at - 1].checkpoint, "transformer") if adapter_at > 0 else None
    tags = {"sweep": sweep_id, "trial": trial_id, "cycle": record.cycle, "stage": record.stage, metric: value,
            "base_model": str(experiment["model"].get("path") or experiment["model"].get("preset"))}
    run_id = tracker.trial_runs.get(trial_id) or tracker.find_trial_run(trial_id)
    with contextlib.ExitStack() as local:  # checkpoints on a shared URI are downloaded for the upload
        adapter_dir, base_dir = (local.enter_context(storage.local_copy(d)) if d else None
                                 for d in (adapter_dir, base_dir))
        return register_adapter(tracker.uri, run_id, model_name, alias, adapter_dir, base_dir, experiment["model"],
                                tags)
