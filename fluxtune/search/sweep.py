"""`fluxtune search`: Optuna (through Tune) samples the space, one Train worker group per trial, MLflow listens.

A sweep lives in `runs/<sweep>/` (sweep.json, Tune and Train folders, the stage cache, best.yaml) and its Optuna
study in durable storage beside the MLflow store, so an interrupted sweep resumes (`Tuner.restore`: finished
trials stay finished, unfinished ones continue from their last stage checkpoint) and a finished one is
extended (`--more N`: a new Tune run on the same study, so the sampler learns from every earlier trial).
This module orchestrates; what is published (`publish`), kept (`retention`), stopped (`guard`) and locked
(`locks`) is decided in those modules.
"""

from __future__ import annotations

import itertools
import contextlib
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
from rich.console import Console
from rich.markup import escape

from fluxtune import __version__
from fluxtune import storage
from fluxtune.config.load import sample_experiment
from fluxtune.config.paths import corner_trees
from fluxtune.config.schedule import planned_steps
from fluxtune.config.schema import SearchFile, SearchSpec
from fluxtune import failures
from fluxtune.failures import keep_errors_in, quiet_trial_tracebacks
from fluxtune.plugins import plugin_set
from fluxtune.registry import registry
from fluxtune.search.callbacks import StopFinishedRuns, ConsoleProgress, MlflowSweepCallback
from fluxtune.search.guard import (FiniteOptunaSearch, ResumableLimiter, StorageFaultWatch, SweepGuard,
                                   not_finite_reason, storage_fault, tune_state_faults)
from fluxtune.search.locks import Locks, lock_stores, lock_sweep
from fluxtune.search.publish import mark_failed, publish_sweep
from fluxtune.search.record import SweepRecord, fingerprint
from fluxtune.search.retention import CheckpointKeeper, disk_use, remove_incomplete, repair_cut_short
from fluxtune.search.space import (DefineByRun, fail_abandoned, max_total_steps, optuna_sampler, optuna_storage,
                                   optuna_storage_url, study_summary)
from fluxtune.tracking.registry import resolve_registered_model
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.store import tracking_uri
from fluxtune.train.stops import create_board
from fluxtune.train.cluster import check_resources, local_cpus, start_ray
from fluxtune.train.datasets import prepare_sweep_data
from fluxtune.train.trial import TrialSettings, trainable

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
    fault: str | None = None  # the store stopped taking writes: the sweep stopped, resumable
    disk_bytes: int = 0  # what the sweep's checkpoints folder holds at the end
    weight_files: int = 0  # transformer weight files among them
    keep: str = "needed"

    @property
    def trained_steps(self) -> int:
        return sum(t["steps"] - t["reused_steps"] for t in self.trials)


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
    return list(corner_trees(base, search.space, [k for k in RESOURCE_KEYS if k in search.space]))


def _searcher(search: SearchSpec, base: dict[str, Any], storage_url: str, study: str, earlier_trials: int):
    if not search.space:
        return None
    optuna = FiniteOptunaSearch(space=DefineByRun(search.space, base), metric=search.metric, mode=search.mode,
                                sampler=optuna_sampler(search, seed_offset=earlier_trials), study_name=study,
                                storage=optuna_storage(storage_url))
    return ResumableLimiter(optuna, max_concurrent=search.max_concurrent)


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
    locks = Locks()  # held until this function returns (or the process ends, however it ends)
    if resume or more:
        record = SweepRecord.to_continue(root, spec.name, finished=bool(more), fp=fp, spec_file=spec_file)
        lock_sweep(locks, Path(record.folder), record.sweep_id, spec_file)
    else:
        record = SweepRecord.new(root, spec.name, fp)
    uri = tracking_uri(spec.tracking.uri)
    record.optuna_storage = record.optuna_storage or optuna_storage_url(uri, str(root))
    lock_stores(locks, [uri, record.optuna_storage], record.sweep_id, spec_file)
    try:
        return _run_locked(spec, base, jsonl, spec_path, spec_file, console, address, verbose, resume, more, search,
                           shared_root, root, record, uri, locks)
    finally:
        locks.release()


def _run_locked(spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None, spec_file: str,
                console: Console, address: str | None, verbose: bool, resume: bool, more: int, search: SearchSpec,
                shared_root: str | None, root: Path, record: SweepRecord, uri: str, locks: Locks) -> SweepOutcome:
    folder = Path(record.folder)
    keep_errors_in(folder)  # an unexpected error from here on keeps its traceback in the sweep folder
    trial_storage = storage.join(shared_root, record.sweep_id) if shared_root else str(folder)

    local_ray = start_ray(address, local_cpus(base["workers"], base["cpus_per_worker"], search.max_concurrent), verbose)
    stop_board = create_board(record.sweep_id)  # held for the whole sweep: workers look it up by name
    check_resources(_resource_corners(base, search), spec_file)  # before anything is written
    if not (resume or more):
        lock_sweep(locks, folder, record.sweep_id, spec_file)

    base = {**base, "model": resolve_registered_model(base["model"], uri, folder)}  # models:/… → a local folder
    experiment_name = spec.tracking.experiment or spec.name
    plugins = plugin_set()
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
    if resume and record.stopped_by:
        console.print(f"(it stopped last time because: {escape(record.stopped_by)})")

    # Rows checked again; the latent cache (one per searched data-key combination) built once, before any trial.
    prepared = prepare_sweep_data(jsonl, base, space=search.space)
    if not (resume or more):
        tracker.log_sweep_params(prepared.mlflow_params())
    console.print(f"data: {prepared.summary()}")
    settings = TrialSettings(sweep_id=record.sweep_id, base=base, jsonl=prepared.source, storage_path=trial_storage,
                             plugins=plugins, reuse_stages=search.reuse_stages, max_failures=search.max_failures)
    reg = registry()

    def experiment_of(config: dict[str, Any]) -> dict[str, Any]:
        return sample_experiment(base, config, reg)

    def warn(line: str) -> None:
        console.print(f"[yellow]warning[/]: {escape(line)}")

    guard = SweepGuard(search.metric)
    keeper = CheckpointKeeper(settings, record, search.metric, search.mode, spec.checkpoints.keep,
                              spec.tracking.register_top, guard, experiment_of, warn)
    # The storage watch first: on a full store its small record write goes before the others' error files.
    callbacks = [StorageFaultWatch(guard, record),
                 MlflowSweepCallback(tracker, plugins, experiment_of, trial_storage, scheduler=search.scheduler.type,
                                     sweep_folder=str(folder)),
                 keeper, StopFinishedRuns(record.sweep_id),
                 ConsoleProgress(search.metric, console, search.mode, more or search.num_samples, search.scheduler.type,
                                 lambda config: planned_steps(experiment_of(config)), sweep_folder=str(folder))]

    if resume:  # what a store that filled up (or a crash) cut short goes first
        repair_cut_short(trial_storage, warn)
        tune_dir = storage.join(trial_storage, "tune", record.tune_runs[-1])
        tuner = tune.Tuner.restore(tune_dir, trainable(settings), resume_unfinished=True, resume_errored=True)
        # The pickled callbacks hold the old process's tracker and console: use this process's.
        tuner._local_tuner.get_run_config().callbacks = callbacks
        tuner._local_tuner.get_run_config().stop = guard
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
                                      callbacks=callbacks, stop=guard),
        )
    # Tune's per-trial result.json/progress.csv loggers are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): the results
    # come from memory and the driver's MLflow callback, so its "could not fetch metrics" warning is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if not verbose:  # a failed trial is one console line naming where its full error is kept, not Tune's traceback
        quiet_trial_tracebacks()
    handler_before = signal.getsignal(signal.SIGINT)
    try:
        with tune_state_faults(guard, trial_storage):
            results = tuner.fit()
        for result in results:
            row = _trial_row(result, search.metric, settings, base, guard)
            if row is not None:
                record.trials[row["trial"]] = row
    except Exception:  # Tune failed after a storage fault (e.g. reading what it could not write): not a bug
        import traceback

        fault = guard.fault or storage_fault(traceback.format_exc())
        if fault is None:
            _mark_interrupted(record, tracker)
            raise
        guard.note_fault(fault)
        results = None
    except BaseException:  # Ctrl+C twice: the record must still say the sweep can be resumed
        _mark_interrupted(record, tracker)
        raise
    # Tune returns normally after Ctrl+C (it saves its state first): unfinished or missing trials tell.
    interrupted = (_interrupted_by_user(handler_before) or guard.fault is not None or results is None
                   or results.num_terminated + results.num_errors < len(results)
                   or len(results) < record.expected.get(record.tune_runs[-1], len(results)))
    record.status = "interrupted" if interrupted else "finished"
    record.stopped_by = guard.fault or ""
    outcome = SweepOutcome(sweep_id=record.sweep_id, tracking_uri=uri, experiment=experiment_name,
                           parent_run_id=parent, storage_path=trial_storage, optuna_storage=record.optuna_storage,
                           trials=list(record.trials.values()), interrupted=interrupted, fault=guard.fault,
                           keep=spec.checkpoints.keep)
    for trial_id, reason in guard.diverged.items():
        console.print(f"[red]trial {trial_id} failed[/]: {escape(reason)}; it is never best")
        mark_failed(tracker, trial_id, reason)
    try:
        record.save()
        if search.space and record.trials:
            if not interrupted:  # nothing resumes an errored trial of a finished sweep
                fail_abandoned(record.optuna_storage, record.sweep_id)
            outcome.study_counts = study_summary(record.optuna_storage, record.sweep_id)
        if interrupted:
            console.print("nothing is registered and no best.yaml is written until the sweep completes "
                          "(`fluxtune search FILE --resume`)")
        else:
            published = publish_sweep(outcome.trials, spec.model_copy(update={"search": search}), record, tracker,
                                      trial_storage, experiment_of, warn)
            if published.best is not None:
                outcome.best_trial, outcome.best_config = published.best["trial"], published.best["config"]
                outcome.best_metric = published.best[search.metric]
            outcome.best_yaml, outcome.model_name = published.best_yaml, published.model_name
            outcome.model_version = published.model_version
        keeper.finish(finished=not interrupted)
    except OSError as exc:  # the store filled up (or turned read-only) after the trials
        guard.note_fault(storage_fault(str(exc)) or f"cannot write to {record.folder}: {exc}")
        outcome.fault, outcome.interrupted, record.status = guard.fault, True, "interrupted"
        record.save_quietly()
    remove_incomplete(trial_storage)  # copies a full store cut short: no trial runs any more
    if outcome.fault:
        console.print(f"[red]the sweep stopped[/]: {escape(outcome.fault)}. Nothing half-written was kept; free space "
                      "(or make the store writable), then continue with `fluxtune search FILE --resume`")
    outcome.disk_bytes, outcome.weight_files = disk_use(trial_storage)
    tracker.finish("KILLED" if outcome.interrupted else ("FINISHED" if outcome.best_trial else "FAILED"),
                   {f"best_{search.metric}": outcome.best_metric} if outcome.best_metric is not None else {},
                   {"fluxtune.best_trial": str(outcome.best_trial), "fluxtune.best_yaml": str(outcome.best_yaml)})
    return outcome


def _mark_interrupted(record: SweepRecord, tracker: SweepTracker) -> None:
    record.status = "interrupted"
    record.save_quietly()
    try:
        tracker.finish("KILLED", {}, {})
    except Exception:  # the original error is what matters
        pass


def _interrupted_by_user(handler_before: Any) -> bool:
    """Tune swaps in its own SIGINT handler for a run and puts the previous one back only when Ctrl+C arrives
    (then it returns normally, in-flight trials marked as ended): finding the old handler means interrupted."""
    now = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, handler_before)
    tune_handles_sigint = (threading.current_thread() is threading.main_thread()
                           and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))
    return tune_handles_sigint and now is handler_before


def _trial_row(result: Any, metric: str, settings: TrialSettings, base: dict[str, Any],
               guard: SweepGuard | None = None) -> dict[str, Any] | None:
    if result.config is None and result.error is None:  # Ctrl+C before its first report: --resume reruns it
        return None
    config = result.config or {}  # a trial that failed before its first report has no recorded config
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if trial_id is None:  # failed before its first report
        trial_id = Path(result.path).name if result.path else None
    if trial_id is None:
        return None
    used = storage.read_json(settings.layout.used_record(trial_id))
    reused = int(used["global_step"]) if used else 0
    experiment = sample_experiment(base, config, registry())
    diverged = guard.diverged.get(trial_id) if guard else None
    # the full text of an error is in errors/trial-<id>.txt
    error = failures.redact_text(str(result.error or ""))[:2000] or diverged or not_finite_reason(metrics, metric) or ""
    return {"trial": trial_id, "config": config, "error": error,
            metric: metrics.get(metric), "steps": int(metrics.get("global_step", 0)), "reused_steps": reused,
            "planned_steps": planned_steps(experiment)}
