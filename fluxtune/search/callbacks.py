"""Tune callbacks in the driver: MLflow records every trial; the console shows progress; stopped runs end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.markup import escape

from fluxtune import failures, storage
from fluxtune.config.schedule import planned_steps
from fluxtune.search.guard import not_finite_reason
from fluxtune.search.names import trial_name
from fluxtune.search.progress import SweepProgress, fmt
from fluxtune.tracking.runs import SweepTracker
from fluxtune.train.protocol import SAMPLES_KEY, STEP_METRICS_KEY, TrialReport
RETRIES_TAG = "fluxtune.retries"  # how often Train restarted the trial's workers, over every sweep attempt
LAST_RETRY_TAG = "fluxtune.last_retry"  # what failed, and the step the retry resumed at


@dataclass
class LoggedStage:
    stage: str
    cycle: int
    checkpoint: str


@dataclass
class TrialLog:
    params: dict[str, Any]
    stages: list[LoggedStage] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"
    worker_failures: int = 0  # as counted by this Train run (fluxtune.train.trial.FailureCountingReport)
    stopped: "Stopped | None" = None


@dataclass
class Stopped:
    """A trial a scheduler ended early: by which, at which global step, of how many planned."""

    scheduler: str
    step: int
    planned: int


def stopped_early(report: TrialReport, scheduler: str, planned: int) -> Stopped | None:
    """Tune marks the result a scheduler stops a trial on as `done` before callbacks see it; a trial that runs to
    its end returns instead, and its closing result reaches no callback."""
    step = report.global_step
    return Stopped(scheduler, step, planned) if report.done and step < planned else None


class MlflowSweepCallback(Callback):
    """Child run per trial: params once, per-step metrics, sample grids, stage table and artifacts, loss curves,
    how it ended (stopped early by which scheduler, at which step).

    A restored sweep gets a fresh callback: trials it has not seen start are looked up (by trial id) on the
    first result, so a resumed trial keeps its run.
    """

    def __init__(self, tracker: SweepTracker, plugins: dict[str, str], trial_params, trial_storage: str = "",
                 scheduler: str = "fifo", sweep_folder: str = ""):
        self.tracker = tracker
        self.sweep_folder = sweep_folder  # where a failed trial's error is kept (errors/trial-<id>.txt)
        self.trial_storage = trial_storage  # a URI storage: Ray reports checkpoint paths without the scheme
        self.plugins = plugins
        self.trial_params = trial_params  # config → the full experiment dict of that trial
        self.scheduler = scheduler
        self.trials: dict[str, TrialLog] = {}

    def _ensure(self, trial: Any) -> TrialLog:
        if trial.trial_id not in self.trials:
            params = self.trial_params(trial.config)
            tags = {f"fluxtune.plugin.{k}": v for k, v in self.plugins.items()}
            tags.update({f"fluxtune.sampled.{k}": str(v) for k, v in trial.config.items()})
            self.tracker.start_trial(trial.trial_id, params, tags, name=trial_name(trial.config))
            earlier = [LoggedStage(stage, cycle, path)
                       for cycle, stage, path in self.tracker.stage_checkpoints(trial.trial_id)]
            self.trials[trial.trial_id] = TrialLog(params=params, stages=earlier)
        return self.trials[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        log = self._ensure(trial)
        report = TrialReport.from_result(result)
        self.tracker.log_result(trial.trial_id, report)
        if report.samples:
            self.tracker.log_samples(trial.trial_id, report.samples, report.global_step)
        log.last = {k: v for k, v in result.items() if k not in (STEP_METRICS_KEY, SAMPLES_KEY)}
        log.stopped = stopped_early(report, self.scheduler, planned_steps(log.params))
        if (report.worker_failures or 0) > log.worker_failures:
            self._note_retry(trial.trial_id, log, report)
        if report.stage_end:
            self.tracker.log_stage_summary(trial.trial_id, report)
        if report.stage_end and report.checkpoint_path:
            logged = LoggedStage(str(report.stage), int(report.cycle or 0),
                                 storage.qualify(report.checkpoint_path, self.trial_storage))
            log.stages.append(logged)
            self.tracker.log_stage(trial.trial_id, logged.checkpoint, logged.cycle, logged.stage, report.node or "")

    def _note_retry(self, trial_id: str, log: TrialLog, report: TrialReport) -> None:
        """Tags on the trial's run: the retry count (earlier sweep attempts' included) and what failed."""
        run_id = self.tracker.trial_runs[trial_id]
        earlier = int(self.tracker.client.get_run(run_id).data.tags.get(RETRIES_TAG, 0))
        failures = int(report.worker_failures or 0)
        self.tracker.client.set_tag(run_id, RETRIES_TAG, str(earlier + failures - log.worker_failures))
        self.tracker.client.set_tag(run_id, LAST_RETRY_TAG, f"{report.last_failure or ''}; resumed at step "
                                                            f"{report.resumed_from or 0}")
        log.worker_failures = failures

    def _end(self, trial: Any, status: str) -> None:
        if trial.trial_id not in self.tracker.trial_runs:
            return
        log = self._ensure(trial)
        log.status = status
        self.tracker.log_loss_curves(trial.trial_id)
        stopped = log.stopped if status == "FINISHED" else None
        self.tracker.end_trial(trial.trial_id, status,
                               (stopped.scheduler, stopped.step, stopped.planned) if stopped else None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.tracker.trial_runs.get(trial.trial_id)
        if run_id is not None:  # the full error on the trial's run: an artifact, and its one line as a tag
            failure, kept = failures.keep_trial_failure(trial, self.sweep_folder)
            if kept is not None:
                self.tracker.client.log_artifact(run_id, str(kept), "error")
            line = failures.trial_failure_line(trial.trial_id, failure, None)
            self.tracker.client.set_tag(run_id, "fluxtune.error", failures.redact_text(line)[:5000])
        self._end(trial, "FAILED")


class StopFinishedRuns(Callback):
    """Tell a finished or stopped trial's Train workers to end their run (see fluxtune.train.stops)."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def _stop(self, trial: Any) -> None:
        import ray

        from fluxtune.train.stops import create_board

        ray.get(create_board(self.sweep_id).stop.remote(trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._stop(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._stop(trial)


class ConsoleProgress(Callback):
    """The sweep's progress on the console (fluxtune.search.progress), instead of Tune's wide tables."""

    def __init__(self, metric: str, console: Console, mode: str = "min", total: int | None = None,
                 scheduler: str = "fifo", planned=None, sweep_folder: str = ""):
        self.metric, self.mode, self.total, self.scheduler = metric, mode, total, scheduler
        self.sweep_folder = sweep_folder  # where a failed trial's error is kept (errors/trial-<id>.txt)
        self.planned = planned  # config → the trial's planned global steps
        self.console = console
        self._setup()

    def _setup(self) -> None:
        self.board = SweepProgress(self.console, self.metric, self.mode, self.total)
        self.failures: dict[str, int] = {}  # trial → worker failures seen
        self.names: set[str] = set()
        self.stopped: dict[str, Stopped] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks; a Console holds locks and streams
        return {k: getattr(self, k) for k in ("metric", "mode", "total", "scheduler", "sweep_folder")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=Console(), planned=None)
        self._setup()

    def _planned(self, trial: Any) -> int:
        return int(self.planned(trial.config)) if self.planned else 0

    def _name(self, trial: Any) -> str:
        name, n = trial_name(trial.config), 1
        unique = name
        while unique in self.names:  # as the MLflow run names: -2, -3 … for a repeated configuration
            n += 1
            unique = f"{name}-{n}"
        self.names.add(unique)
        return unique

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.board.started(trial.trial_id, self._name(trial), trial.config, self._planned(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id not in self.board.running:  # a resumed sweep's trial that started before the restart
            self.on_trial_start(iteration, trials, trial)
        report = TrialReport.from_result(result)
        if (report.worker_failures or 0) > self.failures.get(trial.trial_id, 0):
            self.failures[trial.trial_id] = report.worker_failures or 0
            self.board.retried(trial.trial_id, report.resumed_from or 0, str(report.last_failure))
        value = report.value(self.metric)
        self.board.result(trial.trial_id, report.global_step,
                          float(value) if isinstance(value, (int, float)) else None, report.where(), report.stage_end)
        stopped = stopped_early(report, self.scheduler, self._planned(trial))
        if stopped:
            self.stopped[trial.trial_id] = stopped

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        value = f"{self.metric}={fmt(trial.last_result.get(self.metric))}"
        stopped = self.stopped.pop(trial.trial_id, None)
        diverged = not_finite_reason(trial.last_result or {}, self.metric)
        if diverged:  # the sweep's guard stopped it: a failure, not a scheduler's early stop
            self.board.ended(trial.trial_id, "failed", escape(diverged))
        elif stopped:
            self.board.ended(trial.trial_id, "stopped", f"{value}; {stopped.scheduler} stopped it at step "
                                                        f"{stopped.step} of {stopped.planned}")
        else:
            self.board.ended(trial.trial_id, "finished", value)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        failure, kept = failures.keep_trial_failure(trial, self.sweep_folder)
        detail = failures.trial_failure_detail(failure, str(kept) if kept else None)
        self.board.ended(trial.trial_id, "failed", escape(failures.redact_text(detail)), separator="")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.board.close()


