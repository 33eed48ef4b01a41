"""What `fluxtune search` returns: the sweep's trials, its best trial and version, and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
