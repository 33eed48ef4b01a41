"""What a person reads off a trial's run, computed from what the driver receives: which reported numbers are
curves and which are one-per-stage (the stages table), a stage's table row, the stopped-early note, loss curves.
Plain functions over trial reports and an MLflow client; SweepTracker calls them."""

from __future__ import annotations

from typing import Any

from fluxtune.tracking.mlflow_private import SYSTEM_PREFIX  # the worker's node: CPU, memory, GPU (curves)
from fluxtune.train.protocol import (CYCLE_KEY, GLOBAL_STEP_KEY, RESUMED_FROM_KEY, STAGE_KEY, WORKER_FAILURES_KEY,
                                     TrialReport)

CURVES = ("loss", "val_loss")  # drawn into loss_curves.png at the end of a trial
# Reported at stage ends too, and also at every evaluation: points of a curve, not stage summaries.
# An attempt's facts (a restarted trial's step and its worker failures) ride on every report, also when its only
# report after a restart is a stage end: the run's metrics, never only a table row.
CURVE_AT_STAGE_END = {"val_loss", "masked_psnr", "masked_ssim", RESUMED_FROM_KEY, WORKER_FAILURES_KEY}
_TUNE_BOOKKEEPING = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
                     "time_since_restore", "iterations_since_restore", GLOBAL_STEP_KEY, CYCLE_KEY}


def is_training_metric(key: str) -> bool:
    return key not in _TUNE_BOOKKEEPING and not key.startswith(("config", "_"))


def is_stage_summary(key: str) -> bool:
    """`lora/cycle1/val_loss`, a value reported once at a stage's end: a row of the stages table, not a curve."""
    parts = key.split("/")
    return len(parts) == 3 and parts[1].startswith("cycle") and parts[1][5:].isdigit()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(report: TrialReport) -> dict[str, Any]:
    """What the stages reported, and the attempt's marks (numbers too), as MLflow names them."""
    return {**report.metrics, **report.attempt_marks()}


def curve_points(report: TrialReport) -> dict[str, float]:
    """The numbers of a report that are points of a curve at its step (a stage end's others go to its table row)."""
    numbers = _numbers(report)
    curve_at_end = CURVE_AT_STAGE_END | {k for k in numbers if k.startswith(SYSTEM_PREFIX)}
    return {k: v for k, v in numbers.items() if _number(v) and is_training_metric(k)
            and not (report.stage_end and (is_stage_summary(k) or k not in curve_at_end))}


def stage_row(report: TrialReport) -> dict[str, Any]:
    """A stage-end report → its row of the stages table: cycle, stage, global step, then every number the stage
    reported (speed, transition time, validation scores)."""
    row: dict[str, Any] = {CYCLE_KEY: report.cycle or 0, STAGE_KEY: report.stage or "",
                           GLOBAL_STEP_KEY: report.global_step}
    for key, value in _numbers(report).items():
        if (_number(value) and is_training_metric(key) and not is_stage_summary(key)
                and not key.startswith(SYSTEM_PREFIX) and key not in row):
            row[key] = float(value)
    return row


def stopped_note(scheduler: str, step: int, planned: int) -> str:
    """The run description of a trial a scheduler stopped early (markdown, shown on its overview page)."""
    return (f"**Stopped early** by the {scheduler.upper()} scheduler at step {step} of {planned}: its metric lagged "
            "behind other trials' at that point. Its curves end there; it is not a failure.")


def draw_loss_curves(client: Any, run_id: str, title: str) -> None:
    """loss_curves.png: training loss and validation loss over global steps, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")  # the driver has no display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    drawn = 0
    for key in CURVES:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            axes.plot([m.step for m in history], [m.value for m in history], label=key,
                      marker="o" if key.startswith("val") else None)
            drawn += 1
    if not drawn:
        return
    axes.set_xlabel("global step")
    axes.set_yscale("log")
    axes.legend()
    axes.set_title(title)
    client.log_figure(run_id, figure, "loss_curves.png")
