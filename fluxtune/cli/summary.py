"""The end-of-sweep summary: every trial, the best one, and where everything was recorded."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fluxtune.search.names import column_labels, format_value, unique_names


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("—" if value is None else str(value))


def trial_status(trial: dict[str, Any]) -> str:
    """finished / stopped early at step N / failed, as the trial's MLflow run says too."""
    if trial["error"]:
        return "failed"
    if trial.get("steps", 0) < trial.get("planned_steps", 0):
        return f"stopped early at step {trial['steps']}"
    return "finished"


def trials_table(outcome: Any, metric: str) -> Table:
    """One row per trial: its name (as in MLflow), the searched values, the metric, steps and how it ended."""
    keys = list(dict.fromkeys(k for t in outcome.trials for k in (t["config"] or {})))
    labels = column_labels(keys)
    names = unique_names([(t["trial"], t["config"] or {}) for t in outcome.trials])
    table = Table(title=f"sweep {outcome.sweep_id}", title_justify="left")
    table.add_column("trial", no_wrap=True)
    for key in keys:
        table.add_column(labels[key], justify="right", no_wrap=True)
    table.add_column(metric, justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("reused", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for t in outcome.trials:
        best = " ★" if t["trial"] == outcome.best_trial else ""
        status = trial_status(t)
        style = "red" if status == "failed" else ("yellow" if status.startswith("stopped") else None)
        table.add_row(names[t["trial"]] + best, *[format_value((t["config"] or {}).get(k, "—")) for k in keys],
                      _fmt(t[metric]), f"{t.get('steps', 0)}/{t.get('planned_steps', '?')}",
                      str(t.get("reused_steps") or ""), status, style=style)
    return table


def print_summary(console: Console, outcome: Any, metric: str) -> None:
    console.print(trials_table(outcome, metric))
    reused = sum(t.get("reused_steps", 0) for t in outcome.trials)
    console.print(f"training steps: {outcome.trained_steps} run" + (f", {reused} reused from identical stages"
                                                                    if reused else ""))
    if outcome.interrupted:
        console.print("[yellow]the sweep was interrupted[/]: continue it with `fluxtune search FILE --resume`")
    if outcome.best_trial is None:
        if not outcome.interrupted:
            console.print("[red]no trial finished[/]")
        print_disk_use(console, outcome)
        return
    best_name = unique_names([(t["trial"], t["config"] or {}) for t in outcome.trials]).get(outcome.best_trial)
    console.print(f"best trial [bold]{best_name}[/] ({outcome.best_trial}): {metric}={_fmt(outcome.best_metric)}")
    for key, value in outcome.best_config.items():
        console.print(f"  {key}: {_fmt(value)}")
    console.print(f"best configuration: {outcome.best_yaml}  (fluxtune run {outcome.best_yaml})")
    console.print(f"MLflow: {outcome.tracking_uri} experiment {outcome.experiment!r}, sweep run {outcome.parent_run_id}")
    if outcome.model_version:
        console.print(f"registered model {outcome.model_name!r} version {outcome.model_version}")
    if outcome.study_counts:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(outcome.study_counts.items()))
        console.print(f"Optuna study {outcome.sweep_id!r} in {outcome.optuna_storage} ({counts}); "
                      f"add trials with `fluxtune search FILE --more N`")
    console.print(f"checkpoints: {outcome.storage_path}")
    print_disk_use(console, outcome)


def print_disk_use(console: Console, outcome: Any) -> None:
    """What the sweep's checkpoints hold on disk now (retention: `checkpoints: {keep: needed | all}`)."""
    console.print(f"disk: {outcome.disk_bytes / 2**20:.1f} MiB in {outcome.storage_path}, {outcome.weight_files} "
                  f"transformer weight file{'s' if outcome.weight_files != 1 else ''} (checkpoints: keep "
                  f"{outcome.keep})")
