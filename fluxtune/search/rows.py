"""What the driver knows about each trial: the experiment its sampled config makes, and its sweep-file row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from fluxtune import failures, storage
from fluxtune.components import Components, loaded_components
from fluxtune.config.resolved import ResolvedTrial, resolve_trial
from fluxtune.search.guard import SweepGuard, not_finite_reason
from fluxtune.train.trial import TrialSettings


class TrialExperiments:
    """config → the resolved trial of that config, resolved once per config: resolving validates the whole tree
    again, and the callbacks, retention, rows and publishing all ask for the same trials. Called, it gives the
    trial's (read-only) experiment, which callers share."""

    def __init__(self, base: dict[str, Any], components: Components | None = None):
        self.base = base
        self._components = components
        self._by_config: dict[str, ResolvedTrial] = {}

    @property
    def components(self) -> Components:
        return self._components or loaded_components()

    def resolve(self, config: dict[str, Any]) -> ResolvedTrial:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._by_config:
            self._by_config[key] = resolve_trial(self.base, config, self.components)
        return self._by_config[key]

    def __call__(self, config: dict[str, Any]) -> Mapping[str, Any]:
        return self.resolve(config).experiment

    def planned_steps(self, config: dict[str, Any]) -> int:
        """The global steps the trial plans (the searcher holds this bound method: it pickles with the cache)."""
        return self.resolve(config).planned_steps

    def experiment_dict(self, config: dict[str, Any]) -> dict[str, Any]:
        """A changeable copy of the trial's experiment (what a YAML writer takes)."""
        return self.resolve(config).experiment_dict()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the callbacks and the searcher holding it (the searcher with plain pickle, which cannot take
        # a plugin's lambda factory): the cache is rebuilt, and the component table is the unpickling process's own
        return {**self.__dict__, "_by_config": {}, "_components": None}


def trial_row(result: Any, metric: str, settings: TrialSettings, base: dict[str, Any],
              guard: SweepGuard | None = None, experiments: TrialExperiments | None = None) -> dict[str, Any] | None:
    """The sweep file's row for a Tune result (`experiments`: the sweep's, made from the same `base`);
    None for a trial that never reported (a resumed sweep reruns it)."""
    if result.config is None and result.error is None:  # Ctrl+C before its first report: --resume reruns it
        return None
    config = result.config or {}  # a trial that failed before its first report has no recorded config
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if trial_id is None:  # failed before its first report
        trial_id = Path(result.path).name if result.path else None
    if trial_id is None:
        return None
    used = storage.read_json(settings.layout.reused_prefix(trial_id))
    reused = int(used["global_step"]) if used else 0
    resolved = (experiments or TrialExperiments(base)).resolve(config)
    diverged = guard.diverged.get(trial_id) if guard else None
    # the full text of an error is in errors/trial-<id>.txt
    error = failures.redact_text(str(result.error or ""))[:2000] or diverged or not_finite_reason(metrics, metric) or ""
    return {"trial": trial_id, "config": config, "error": error,
            metric: metrics.get(metric), "steps": int(metrics.get("global_step", 0)), "reused_steps": reused,
            "planned_steps": resolved.planned_steps}
