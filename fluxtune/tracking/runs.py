"""The run tree of a sweep: one parent run, one child run per trial, metrics with steps, stage artifacts.

Only the driver writes (Tune callbacks call in here), so a sqlite store never sees concurrent writers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fluxtune.tracking.store import client, ensure_experiment

BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → {"stages.lora.adapter.rank": "64"}; stages are keyed by name like search paths."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(i, dict) and "name" in i for i in tree):
        for item in tree:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
    else:
        out[prefix.rstrip(".")] = str(tree)[:6000]
    return out


class SweepTracker:
    def __init__(self, uri: str, experiment: str, sweep_name: str):
        self.uri = uri
        self._client = None
        self.experiment_id = ensure_experiment(uri, experiment)
        self.sweep_name = sweep_name
        self.parent_run_id: str | None = None
        self.trial_runs: dict[str, str] = {}

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the client (locks, sessions) is rebuilt lazily.
        return {**self.__dict__, "_client": None}

    def start(self, spec_path: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=self.sweep_name,
                                     tags={**tags, "fluxtune.kind": "sweep"})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        if spec_path:
            self.client.log_artifact(self.parent_run_id, spec_path)
        return self.parent_run_id

    def start_trial(self, trial_id: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_id}",
            tags={**tags, "mlflow.parentRunId": self.parent_run_id, "fluxtune.kind": "trial",
                  "fluxtune.trial_id": trial_id},
        )
        self.trial_runs[trial_id] = run.info.run_id
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, points in series.items()
                   for step, value in points]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH])

    def log_result(self, trial_id: str, result: dict[str, Any], step_key: str, steps_json_key: str) -> None:
        """One Tune result: its buffered per-step metrics, and its scalar metrics at the result's step."""
        run_id = self.trial_runs[trial_id]
        series = {k: [tuple(p) for p in v] for k, v in json.loads(result.get(steps_json_key) or "{}").items()}
        step = int(result.get(step_key, 0))
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_training_metric(key):
                series.setdefault(key, []).append((step, value))
        self.log_metrics(run_id, series)

    def log_stage_artifacts(self, trial_id: str, checkpoint_dir: str, artifact_path: str) -> None:
        exports = Path(checkpoint_dir) / "exports"
        if exports.is_dir():
            self.client.log_artifacts(self.trial_runs[trial_id], str(exports), artifact_path=artifact_path)

    def end_trial(self, trial_id: str, status: str) -> None:
        if trial_id in self.trial_runs:
            self.client.set_terminated(self.trial_runs[trial_id], status=status)

    def finish(self, status: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.parent_run_id, key, value)
        if metrics:
            self.log_metrics(self.parent_run_id, {k: [(0, v)] for k, v in metrics.items()})
        self.client.set_terminated(self.parent_run_id, status=status)


_TUNE_BOOKKEEPING = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
                     "time_since_restore", "iterations_since_restore", "global_step", "cycle"}


def _is_training_metric(key: str) -> bool:
    return key not in _TUNE_BOOKKEEPING and not key.startswith(("config", "_"))
