"""`fluxtune search`: Optuna (through Tune) samples the space, one Train worker group per trial, MLflow listens.

A sweep lives in `runs/<sweep>/` (sweep.json, Tune and Train folders, the stage cache, best.yaml) and its Optuna
study in durable storage beside the MLflow store, so an interrupted sweep resumes (`Tuner.restore`: finished
trials stay finished, unfinished ones continue from their last stage checkpoint) and a finished one is
extended (`--more N`: a new Tune run on the same study, so the sampler learns from every earlier trial).
This module orchestrates, in the steps of `Sweep`; what is published (`publish`), kept (`retention`), stopped
(`guard`), locked (`locks`), searched and scheduled (`tuning`), ranked (`ranking`) and recorded per trial
(`rows`) is decided in those modules; registering versions is MLflow's side (`fluxtune.tracking.publishing`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from ray import tune
from rich.console import Console
from rich.markup import escape

from fluxtune import __version__
from fluxtune import storage
from fluxtune.config.schema import SearchFile, SearchSpec
from fluxtune.failures import keep_errors_in, quiet_trial_tracebacks
from fluxtune.plugins import plugin_set
from fluxtune.search.callbacks import StopFinishedRuns, ConsoleProgress, MlflowSweepCallback
from fluxtune.search.guard import (StorageFaultWatch, SweepGuard, not_finite_reason, storage_fault,
                                   tune_state_faults)
from fluxtune.search.locks import Locks, lock_stores, lock_sweep
from fluxtune.search.outcome import SweepOutcome
from fluxtune.search.publish import publish_sweep, sweep_ranking
from fluxtune.search.retention import CheckpointKeeper, disk_use, remove_incomplete, repair_cut_short
from fluxtune.search.rows import TrialExperiments, trial_row
from fluxtune.search.space import StudyUnreadable, fail_abandoned, optuna_storage_url, study_summary
from fluxtune.search.sweep_file import SweepFile, fingerprint
from fluxtune.search.tuning import resource_corners, scheduler_for, searcher_for
from fluxtune.tracking.model_versions import resolve_registered_model
from fluxtune.tracking.publishing import mark_failed
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.store import tracking_uri
from fluxtune.train.cluster import check_resources, local_cpus, start_ray
from fluxtune.train.datasets import prepare_sweep_data
from fluxtune.train.ray_private import restore_tuner
from fluxtune.train.stops import create_board
from fluxtune.train.trial import TrialSettings, trainable


def run_sweep(spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None = None,
              console: Console | None = None, address: str | None = None, verbose: bool = False,
              resume: bool = False, more: int = 0) -> SweepOutcome:
    sweep = Sweep.open(spec, base, jsonl, spec_path, console, address, verbose, resume, more)
    try:
        sweep.prepare()
        sweep.collect(sweep.tuner())
        return sweep.finish(sweep.publish())
    finally:
        sweep.close()


class Sweep:
    """One `fluxtune search` run, in the order its steps must happen: `open` (sweep file and locks), `prepare` (Ray,
    model, tracker, data), `tuner` (a new Tune run, or the interrupted one restored), `collect` (run it; the
    sweep file's rows), `publish` (best.yaml, registration, retention), `finish` (what is left on disk, the MLflow
    run's end) and, always, `close` (the locks go)."""

    def __init__(self, spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None,
                 console: Console, address: str | None, verbose: bool, resume: bool, more: int):
        self.spec, self.base, self.jsonl, self.spec_path = spec, base, jsonl, spec_path
        self.console, self.address, self.verbose, self.resume, self.more = console, address, verbose, resume, more
        self.spec_file = spec_path or "<spec>"
        self.search = spec.search or SearchSpec(num_samples=1, max_concurrent=1)
        # The sweep file, best.yaml and model downloads stay on the driver's disk; with a URI `storage_path` the
        # trials' checkpoints and the stage-reuse index go there instead, where every node of a cluster reaches them.
        self.shared_root = spec.storage_path if spec.storage_path and storage.is_uri(spec.storage_path) else None
        self.root = Path(spec.storage_path if self.shared_root is None and spec.storage_path else "runs").resolve()
        self.locks = Locks()  # held until `close` (or the process ends, however it ends)
        self.stop_board = None
        self.interrupted = False

    @classmethod
    def open(cls, spec: SearchFile, base: dict[str, Any], jsonl: str, spec_path: str | None = None,
             console: Console | None = None, address: str | None = None, verbose: bool = False,
             resume: bool = False, more: int = 0) -> Sweep:
        """The sweep file (new, or the one to resume or extend), its folder's lock when it continues, and the
        stores' locks; `close` releases them."""
        sweep = cls(spec, base, jsonl, spec_path, console or Console(), address, verbose, resume, more)
        fp = fingerprint(spec, base)
        if resume or more:
            sweep.sweep_file = SweepFile.to_continue(sweep.root, spec.name, finished=bool(more), fp=fp,
                                                     spec_file=sweep.spec_file)
            lock_sweep(sweep.locks, Path(sweep.sweep_file.folder), sweep.sweep_file.sweep_id, sweep.spec_file)
        else:
            sweep.sweep_file = SweepFile.new(sweep.root, spec.name, fp)
        sweep_file = sweep.sweep_file
        sweep.uri = tracking_uri(spec.tracking.uri)
        sweep_file.optuna_storage = sweep_file.optuna_storage or optuna_storage_url(sweep.uri, str(sweep.root))
        lock_stores(sweep.locks, [sweep.uri, sweep_file.optuna_storage], sweep_file.sweep_id, sweep.spec_file)
        return sweep

    @property
    def continues(self) -> bool:
        return bool(self.resume or self.more)

    def prepare(self) -> None:
        """Ray and the resources check before anything is written; then the model, the sweep file (running), the
        MLflow parent run, the data (rows checked, latent caches built) and the trials' settings."""
        sweep_file, search, spec = self.sweep_file, self.search, self.spec
        self.folder = folder = Path(sweep_file.folder)
        keep_errors_in(folder)  # an unexpected error from here on keeps its traceback in the sweep folder
        self.trial_storage = storage.join(self.shared_root, sweep_file.sweep_id) if self.shared_root else str(folder)

        local_ray = start_ray(self.address, local_cpus(self.base["workers"], self.base["cpus_per_worker"],
                                                       search.max_concurrent), self.verbose)
        self.stop_board = create_board(sweep_file.sweep_id)  # held for the whole sweep: workers look it up by name
        check_resources(resource_corners(self.base, search), self.spec_file)  # before anything is written
        if not self.continues:
            lock_sweep(self.locks, folder, sweep_file.sweep_id, self.spec_file)

        self.base = base = {**self.base, "model": resolve_registered_model(self.base["model"], self.uri, folder)}
        self.experiment_name = spec.tracking.experiment or spec.name
        self.plugins = plugins = plugin_set()
        sweep_file.status = "running"
        if local_ray is not None:  # where its logs are, and which session to look for if the driver is killed
            sweep_file.ray_sessions.append(local_ray.describe())
        sweep_file.save()
        self.tracker = tracker = SweepTracker(
            self.uri, self.experiment_name, sweep_file.sweep_id, upload_checkpoints=spec.tracking.upload_checkpoints,
            spill_dir=Path(sweep_file.folder))  # MLflow outages: unlogged writes wait in the sweep folder
        self.parent = tracker.start(self.spec_path,
                                    tags={"fluxtune.version": __version__, "fluxtune.git_revision": _git_revision(),
                                          **{f"fluxtune.plugin.{k}": v for k, v in plugins.items()}},
                                    params={"search": search.model_dump(mode="json"), "base": base})
        how = "resumed" if self.resume else (f"extended by {self.more} trials" if self.more else "started")
        self.console.print(f"sweep [bold]{sweep_file.sweep_id}[/] {how}: MLflow experiment {self.experiment_name!r} at "
                           f"{self.uri}, run {self.parent}")
        if self.resume and sweep_file.stopped_by:
            self.console.print(f"(it stopped last time because: {escape(sweep_file.stopped_by)})")

        # Rows checked again; the latent cache (one per searched data-key combination) built once, before any trial.
        prepared = prepare_sweep_data(self.jsonl, base, space=search.space)
        if not self.continues:
            tracker.log_sweep_params(prepared.mlflow_params())
        self.console.print(f"data: {prepared.summary()}")
        self.settings = TrialSettings(sweep_id=sweep_file.sweep_id, base=base, jsonl=prepared.source,
                                      storage_path=self.trial_storage, plugins=plugins,
                                      reuse_stages=search.reuse_stages, max_failures=search.max_failures)
        self.experiments = TrialExperiments(base)
        self.guard = SweepGuard(search.metric)

    def warn(self, line: str) -> None:
        self.console.print(f"[yellow]warning[/]: {escape(line)}")

    def tuner(self) -> tune.Tuner:
        """The interrupted Tune run restored (`resume`), or a new one (its name and trial count recorded first),
        with this process's callbacks and stop rule."""
        sweep_file, search, settings, experiments = self.sweep_file, self.search, self.settings, self.experiments
        self.keeper = CheckpointKeeper(settings, sweep_file, sweep_ranking(search, sweep_file), self.spec.checkpoints.keep,
                                       self.spec.tracking.register_top, self.guard, experiments, self.warn)
        # The storage watch first: on a full store its small sweep file write goes before the others' error files.
        callbacks = [StorageFaultWatch(self.guard, sweep_file),
                     MlflowSweepCallback(self.tracker, self.plugins, experiments, self.trial_storage,
                                         scheduler=search.scheduler.type, sweep_folder=str(self.folder)),
                     self.keeper, StopFinishedRuns(sweep_file.sweep_id),
                     ConsoleProgress(search.metric, self.console, search.mode, self.more or search.num_samples,
                                     search.scheduler.type, experiments.planned_steps,
                                     sweep_folder=str(self.folder))]
        if self.resume:  # what a store that filled up (or a crash) cut short goes first
            repair_cut_short(self.trial_storage, self.warn)
            tune_dir = self.settings.layout.tune_run(sweep_file.tune_runs[-1])
            return restore_tuner(tune_dir, trainable(settings), callbacks, self.guard)
        tune_name = "tune" if not sweep_file.tune_runs else f"more-{len(sweep_file.tune_runs)}"
        sweep_file.tune_runs.append(tune_name)
        sweep_file.expected[tune_name] = self.more or search.num_samples
        sweep_file.save()
        searcher = searcher_for(search, self.base, sweep_file.optuna_storage, sweep_file.sweep_id, len(sweep_file.trials),
                                experiments.planned_steps)
        return tune.Tuner(
            trainable(settings),
            # metric/mode live on the searcher and scheduler: a define-by-run OptunaSearch ignores Tune's
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler_for(search, self.base),
                                        num_samples=self.more or search.num_samples,
                                        max_concurrent_trials=None if searcher else search.max_concurrent),
            run_config=tune.RunConfig(name=tune_name, storage_path=self.settings.layout.tune,
                                      verbose=0, callbacks=callbacks, stop=self.guard),
        )

    def collect(self, tuner: tune.Tuner) -> bool:
        """Run the trials; their rows go into the sweep file. True when the sweep was interrupted (Ctrl+C, a storage
        fault, trials unfinished or missing): the sweep file says so. Any other error marks it interrupted, then
        propagates."""
        sweep_file, guard = self.sweep_file, self.guard
        # Tune's per-trial result.json/progress.csv loggers are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): the results
        # come from memory and the driver's MLflow callback, so its "could not fetch metrics" warning is noise.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        if not self.verbose:  # a failed trial is one console line naming where its full error is kept, not a traceback
            quiet_trial_tracebacks()
        handler_before = signal.getsignal(signal.SIGINT)
        try:
            with tune_state_faults(guard, self.trial_storage):
                results = tuner.fit()
            for result in results:
                row = trial_row(result, self.search.metric, self.settings, self.base, guard, self.experiments)
                if row is None:
                    continue
                earlier = sweep_file.trials.get(row["trial"], {}).get("error")
                if not_finite_reason(result.metrics or {}, self.search.metric) and row["error"] != earlier:
                    # diverged in this run. A restored Tune run may call a copy of the guard, not this one: its
                    # MLflow run would stay FINISHED
                    guard.diverged.setdefault(row["trial"], row["error"])
                sweep_file.trials[row["trial"]] = row
        except Exception:  # Tune failed after a storage fault (e.g. reading what it could not write): not a bug
            import traceback

            fault = guard.fault or storage_fault(traceback.format_exc())
            if fault is None:
                self._mark_interrupted()
                raise
            guard.note_fault(fault)
            results = None
        except BaseException:  # Ctrl+C twice: the sweep file must still say the sweep can be resumed
            self._mark_interrupted()
            raise
        # Tune returns normally after Ctrl+C (it saves its state first): unfinished or missing trials tell.
        self.interrupted = (_interrupted_by_user(handler_before) or guard.fault is not None or results is None
                            or results.num_terminated + results.num_errors < len(results)
                            or len(results) < sweep_file.expected.get(sweep_file.tune_runs[-1], len(results)))
        sweep_file.status = "interrupted" if self.interrupted else "finished"
        sweep_file.stopped_by = guard.fault or ""
        return self.interrupted

    def publish(self) -> SweepOutcome:
        """Diverged trials marked failed; the sweep file saved; for a completed sweep the study's abandoned trials
        failed, best.yaml written and the best trials registered; retention finished. A store that stops taking
        writes here ends the sweep interrupted (resumable), not with an error."""
        sweep_file, search, guard, interrupted = self.sweep_file, self.search, self.guard, self.interrupted
        outcome = SweepOutcome(sweep_id=sweep_file.sweep_id, tracking_uri=self.uri, experiment=self.experiment_name,
                               parent_run_id=self.parent, storage_path=self.trial_storage,
                               optuna_storage=sweep_file.optuna_storage, trials=list(sweep_file.trials.values()),
                               interrupted=interrupted, fault=guard.fault, keep=self.spec.checkpoints.keep)
        for trial_id, reason in guard.diverged.items():
            self.console.print(f"[red]trial {trial_id} failed[/]: {escape(reason)}; it is never best")
            mark_failed(self.tracker, trial_id, reason)
        try:
            sweep_file.save()
            try:
                if search.space and sweep_file.trials:
                    if not interrupted:  # nothing resumes an errored trial of a finished sweep
                        fail_abandoned(sweep_file.optuna_storage, sweep_file.sweep_id)
                    outcome.study_counts = study_summary(sweep_file.optuna_storage, sweep_file.sweep_id)
                if interrupted:
                    self.console.print("nothing is registered and no best.yaml is written until the sweep completes "
                                       "(`fluxtune search FILE --resume`)")
                else:
                    self._publish(outcome)
            except StudyUnreadable as exc:  # the study decides what is best: without it nothing is published
                self.console.print(f"[red]nothing is published[/]: {escape(str(exc))} (best.yaml and the registered "
                                   "versions are chosen from it)")
            self.keeper.finish(finished=not interrupted)
        except OSError as exc:  # the store filled up (or turned read-only) after the trials
            guard.note_fault(storage_fault(str(exc)) or f"cannot write to {sweep_file.folder}: {exc}")
            outcome.fault, outcome.interrupted, sweep_file.status = guard.fault, True, "interrupted"
            sweep_file.save_quietly()
        return outcome

    def _publish(self, outcome: SweepOutcome) -> None:
        search = self.search
        published = publish_sweep(outcome.trials, self.spec.model_copy(update={"search": search}), self.sweep_file,
                                  self.tracker, self.trial_storage, self.experiments.experiment_dict, self.warn)
        if published.best is not None:
            outcome.best_trial, outcome.best_config = published.best["trial"], published.best["config"]
            outcome.best_metric = published.best[search.metric]
        outcome.best_yaml, outcome.model_name = published.best_yaml, published.model_name
        outcome.model_version = published.model_version

    def finish(self, outcome: SweepOutcome) -> SweepOutcome:
        """Copies a full store cut short removed, the fault (if any) told, disk use measured, the MLflow parent
        run ended (KILLED when interrupted, FAILED without a best trial)."""
        remove_incomplete(self.trial_storage)  # copies a full store cut short: no trial runs any more
        if outcome.fault:
            self.console.print(f"[red]the sweep stopped[/]: {escape(outcome.fault)}. Nothing half-written was kept; "
                               "free space (or make the store writable), then continue with "
                               "`fluxtune search FILE --resume`")
        outcome.disk_bytes, outcome.weight_files = disk_use(self.trial_storage)
        metric = self.search.metric
        self.tracker.finish("KILLED" if outcome.interrupted else ("FINISHED" if outcome.best_trial else "FAILED"),
                            {f"best_{metric}": outcome.best_metric} if outcome.best_metric is not None else {},
                            {"fluxtune.best_trial": str(outcome.best_trial),
                             "fluxtune.best_yaml": str(outcome.best_yaml)})
        return outcome

    def close(self) -> None:
        """The stop board handle dropped (its actor ends with the driver's last handle), then the locks released."""
        self.stop_board = None
        self.locks.release()

    def _mark_interrupted(self) -> None:
        self.sweep_file.status = "interrupted"
        self.sweep_file.save_quietly()
        try:
            self.tracker.finish("KILLED", {}, {})
        except Exception:  # the original error is what matters
            pass


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _interrupted_by_user(handler_before: Any) -> bool:
    """Tune swaps in its own SIGINT handler for a run and puts the previous one back only when Ctrl+C arrives
    (then it returns normally, in-flight trials marked as ended): finding the old handler means interrupted."""
    now = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, handler_before)
    tune_handles_sigint = (threading.current_thread() is threading.main_thread()
                           and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))
    return tune_handles_sigint and now is handler_before
