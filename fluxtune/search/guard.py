"""What stops trials or the sweep itself, so that nothing untrustworthy is learnt from or published.

- A trial whose searched metric is not finite (NaN, ±inf: it diverged) is stopped at that report and fails:
  it is never best, and its Optuna trial ends FAIL (see `FiniteOptunaSearch`). A trial a scheduler stopped early
  ends PRUNED: the study's COMPLETE trials are the ones that ran their whole plan.
- A store that takes no more writes (disk full, quota, file-size limit, read-only) fails the trial that hit it
  and stops the sweep, resumable, instead of failing every later trial in turn.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from fluxtune.search.ranking import PLANNED_STEPS_ATTR, TRIAL_ID_ATTR, is_finite
from fluxtune.train.protocol import GLOBAL_STEP_KEY

STORAGE_FAULTS = ("no space to write stage checkpoint", "cannot write stage checkpoint", "No space left on device",
                  "Disk quota exceeded", "File too large", "Read-only file system")


def not_finite_reason(result: dict[str, Any], metric: str) -> str | None:
    value = result.get(metric)
    if value is None or is_finite(value):
        return None
    return f"{metric} is {value} at step {result.get(GLOBAL_STEP_KEY, '?')}: not finite (the trial diverged)"


def storage_fault(text: str) -> str | None:
    """The line of an error text that says the store is full or read-only, if one does."""
    for line in reversed(text.splitlines()):
        if any(marker in line for marker in STORAGE_FAULTS):
            return line.strip()
    return None


class SweepGuard(tune.Stopper):
    """Tune's stopper for the sweep: a trial at its first non-finite metric. After a storage fault it ends the
    whole run the way Ctrl+C does (Tune's SIGUSR1: its state saved with the running trials still running, so
    `--resume` continues them), not with `stop_all`, which would mark them finished for good."""

    def __init__(self, metric: str):
        self.metric = metric
        self.fault: str | None = None  # set by the driver's writers and `StorageFaultWatch`
        self.diverged: dict[str, str] = {}  # trial id → why it was stopped
        self.tune_running = False  # Tune's SIGUSR1 handler is installed (see `tune_state_faults`)
        self.signalled = False

    def __getstate__(self) -> dict[str, Any]:  # pickled with Tune's state: a restored sweep starts clean
        return {**self.__dict__, "fault": None, "tune_running": False, "signalled": False}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        reason = not_finite_reason(result, self.metric)
        if reason is not None:
            self.diverged.setdefault(trial_id, reason)
        return reason is not None

    def stop_all(self) -> bool:
        return self.fault is not None and not self.signalled  # no signal handler to end it the better way

    def note_fault(self, line: str) -> None:
        first = self.fault is None
        self.fault = self.fault or line
        handler = signal.getsignal(signal.SIGUSR1) if self.tune_running else None
        if first and callable(handler):  # never the default action (that would end the process)
            self.signalled = True
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save the state" (as on Ctrl+C)


class StorageFaultWatch(tune.Callback):
    """A trial that failed on a full or read-only store stops the sweep (see `SweepGuard`)."""

    def __init__(self, guard: SweepGuard, sweep_file: Any = None):
        self.guard = guard
        self.sweep_file = sweep_file  # SweepFile: says `interrupted` at once, while the store may still take that

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            with open(trial.error_file or "", errors="replace") as handle:
                fault = storage_fault(handle.read())
        except OSError:
            return
        if fault is None:
            return
        if self.sweep_file is not None and self.guard.fault is None:  # before other writers take the last bytes
            self.sweep_file.status, self.sweep_file.stopped_by = "interrupted", fault
            self.sweep_file.save_quietly()
        self.guard.note_fault(fault)


class FiniteOptunaSearch(OptunaSearch):
    """Optuna learns only from finite values, and only a trial that ran its whole plan is COMPLETE.

    Each Optuna trial carries its Tune trial id and planned steps (user attributes), so the study alone says which
    trials ran and how they ended. A diverged trial ends FAIL at once; one a scheduler stopped early (fewer global
    steps than planned) ends PRUNED (holding the last value Optuna was shown on the way, if any). An errored trial
    stays RUNNING in the study while the sweep may still resume it (`--resume` continues errored trials): the end of
    a finished sweep fails what is left (`fluxtune.search.space.fail_abandoned`). Ray's own OptunaSearch tells an
    errored trial COMPLETE with its last value, an early-stopped one COMPLETE too, and leaves a NaN one RUNNING.
    """

    def __init__(self, *args: Any, planned_steps: Callable[[dict[str, Any]], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.planned_steps = planned_steps  # a trial's config → its planned global steps (picklable: Tune saves us)
        self._planned: dict[str, int] = {}  # Tune trial id → planned global steps

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is None or ot_trial is None:
            return config
        ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        try:
            self._planned[trial_id] = int(self.planned_steps(config))
        except Exception:  # a config that makes no valid experiment: the trial itself fails and says why
            return config
        ot_trial.set_user_attr(PLANNED_STEPS_ATTR, self._planned[trial_id])
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if is_finite(result.get(self.metric)):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        value = (result or {}).get(self.metric)
        if error:
            return  # resumable: see the class docstring
        if value is not None and not is_finite(value):
            super().on_trial_complete(trial_id, None, error=True)  # no value + error: Ray tells FAIL
        elif value is not None and self.stopped_early(trial_id, result or {}):
            super().on_trial_complete(trial_id, None, error=False)  # no value, no error: Ray tells PRUNED
        else:
            super().on_trial_complete(trial_id, result, error=False)

    def stopped_early(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Fewer global steps than the trial's config plans (a scheduler ended it)."""
        planned = self._planned.get(trial_id)
        return planned is not None and int(result.get(GLOBAL_STEP_KEY) or 0) < planned


class ResumableLimiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter forgets a trial once it errored, so when `--resume` finishes that trial its
    result never reaches Optuna (which then fails it at the end): forward such a completion to the searcher."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


TUNE_STATE_LOGGER = "ray.tune.execution.experiment_state"
# Tune copies its local state folder to the store in the background while it writes the next searcher state there
# (a temporary `.<uuid>-tmp-<name>` renamed into place): the copy can list that file, then not find it
_TUNE_OWN_TEMPORARY_GONE = re.compile(r"/\.[0-9a-f-]{36}-tmp-[^/]*'?\. Detail: \[errno 2\]|"
                                      r"No such file or directory: '[^']*/\.[0-9a-f-]{36}-tmp-")


def tune_raced_itself(error_text: str) -> bool:
    """A failed save of Tune's state that says only that one of Tune's own temporary files vanished while being
    copied: the store is fine, and Tune's next save copies the whole folder again."""
    return storage_fault(error_text) is None and _TUNE_OWN_TEMPORARY_GONE.search(error_text) is not None


class _TuneStateSaveFailed(logging.Filter):
    """Tune logs a failed save of its own state (a traceback) and carries on: to us it is a storage fault, unless
    Tune only raced with itself on its local copy (see `tune_raced_itself`)."""

    def __init__(self, guard: SweepGuard, where: str):
        super().__init__()
        self.guard, self.where = guard, where

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Saving experiment state to storage"):
            return True
        cause = record.exc_info[1] if record.exc_info else None
        if tune_raced_itself(str(cause)):
            return False
        self.guard.note_fault(storage_fault(str(cause)) or f"cannot save the sweep's Tune state under {self.where}: "
                                                          f"{cause}")
        return False


@contextmanager
def tune_state_faults(guard: SweepGuard, where: str) -> Iterator[None]:
    """While Tune runs: a failed save of Tune's state stops the sweep (see SweepGuard) instead of a traceback."""
    logger = logging.getLogger(TUNE_STATE_LOGGER)
    watch = _TuneStateSaveFailed(guard, where)
    logger.addFilter(watch)
    # Tune installs its SIGUSR1 handler when it runs in the main thread (it always does, whatever the env says)
    guard.tune_running = hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
    try:
        yield
    finally:
        guard.tune_running = False
        logger.removeFilter(watch)
