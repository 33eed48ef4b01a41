"""What a completed sweep publishes: best.yaml for its best trial, and which trials become registered versions.

The order is `fluxtune.search.ranking`'s (the Optuna study's, joined to the sweep file: only trials that ran every
planned step without an error and with a finite metric); an interrupted sweep publishes nothing until it
completes. Registering them is MLflow's side (`fluxtune.tracking.publishing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fluxtune.search.best import release_for, write_best_yaml
from fluxtune.search.ranking import TrialRanking
from fluxtune.train.protocol import SweepLayout


@dataclass
class Published:
    best: dict[str, Any] | None = None  # the best publishable trial's row
    best_yaml: str | None = None
    model_name: str | None = None
    model_version: str | None = None  # the best trial's version (registered now or by an earlier run)


def sweep_ranking(search: Any, sweep_file: Any) -> TrialRanking:
    """The sweep's order (`search`: its SearchSpec): its study's when it searched a space (Optuna ran), else its
    rows'."""
    if search.space:
        return TrialRanking(search.metric, search.mode, sweep_file.optuna_storage, sweep_file.sweep_id)
    return TrialRanking(search.metric, search.mode)


def publish_sweep(rows: list[dict[str, Any]], spec: Any, sweep_file: Any, tracker: Any, trial_storage: str,
                  experiment_of: Callable[[dict[str, Any]], dict[str, Any]], warn: Callable[[str], None]
                  ) -> Published:
    """best.yaml for the best publishable trial; the best `register_top` registered (the best with the alias).
    Raises StudyUnreadable (before anything is written) when the study cannot be read."""
    from fluxtune.tracking.publishing import Candidate, register_versions

    search = spec.search
    order = sweep_ranking(search, sweep_file).best(rows)
    out = Published()
    if not order:
        return out
    out.best = best = order[0]
    out.best_yaml = str(write_best_yaml(SweepLayout.at(sweep_file.folder).best_yaml, spec,
                                        experiment_of(best["config"]), sweep_file.sweep_id, best["trial"], search.metric, best[search.metric]))
    candidates = [Candidate(row, release_for(trial_storage, sweep_file.sweep_id, row["trial"]))
                  for row in order[:spec.tracking.register_top]]
    registered = register_versions(candidates, tracker, sweep_file, spec.tracking.register_as or spec.name,
                                   spec.tracking.alias, search.metric, experiment_of, warn)
    if registered is not None:
        out.model_name, out.model_version = registered
    return out
