"""The end-of-sweep summary: every trial, the best one, and where everything was recorded."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_summary(console: Console, outcome: Any, metric: str) -> None:
    table = Table(title=f"sweep {outcome.sweep_id}")
    keys = sorted({k for t in outcome.trials for k in (t["config"] or {})})
    for column in ["trial", *(k.removeprefix("stages.") for k in keys), metric, "status"]:
        table.add_column(column, overflow="fold")
    for t in sorted(outcome.trials, key=lambda t: str(t["trial"])):
        status = "error" if t["error"] else "done"
        best = " ★" if t["trial"] == outcome.best_trial else ""
        table.add_row(str(t["trial"]) + best, *[_fmt((t["config"] or {}).get(k)) for k in keys],
                      _fmt(t[metric]), status)
    console.print(table)
    if outcome.best_trial is None:
        console.print("[red]no trial finished[/]")
        return
    console.print(f"best trial [bold]{outcome.best_trial}[/]: {metric}={_fmt(outcome.best_metric)}")
    for key, value in outcome.best_config.items():
        console.print(f"  {key}: {_fmt(value)}")
    console.print(f"MLflow: {outcome.tracking_uri} experiment {outcome.experiment!r}, sweep run {outcome.parent_run_id}")
    if outcome.model_version:
        console.print(f"registered model {outcome.model_name!r} version {outcome.model_version}")
    console.print(f"checkpoints: {outcome.storage_path}")
