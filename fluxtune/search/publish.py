"""What a sweep publishes (best.yaml and registered model versions), and only from what can be trusted.

A trial is publishable when it ran every planned step without an error and its metric is finite; an
interrupted sweep publishes nothing until it completes. A version is made of the trial's last stage: its
adapter (when that stage exported one) on the transformer it was trained on, or else the final transformer
itself. Both are checked against the hashes their writer recorded before anything is registered; the base is
referenced (stage checkpoint or model path, with hashes), never copied.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

from fluxtune import storage
from fluxtune.checkpoints import WEIGHTS, usable_checkpoint
from fluxtune.search.best import ADAPTER, StageCheckpoint, stage_records
from fluxtune.registered_version import checkpoint_reference, model_path_reference
from fluxtune.train.protocol import SweepLayout


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def publishable(row: dict[str, Any], metric: str) -> bool:
    return not row.get("error") and is_finite(row.get(metric)) and row["steps"] >= row.get("planned_steps", 0)


def ranked(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Publishable trials, best first (ties: the earlier trial id, so the order never depends on dict order)."""
    good = [r for r in rows if publishable(r, metric)]
    return sorted(good, key=lambda r: (r[metric] if mode == "min" else -r[metric], r["trial"]))


@dataclass(frozen=True)
class Release:
    """The stage checkpoints a version is made of."""

    trial: str
    final: StageCheckpoint
    base: StageCheckpoint | None  # whose transformer is the base; None: the model the experiment names

    @property
    def adapter(self) -> StageCheckpoint | None:
        return self.final if self.final.has_adapter else None

    @property
    def weights(self) -> list[str]:
        """The checkpoint whose transformer weights registering it needs (the adapter is an export: never pruned)."""
        return [self.base.checkpoint] if self.base is not None else []


def release_of(trial: str, stages: list[StageCheckpoint]) -> Release | None:
    if not stages:
        return None
    final = stages[-1]
    if not final.has_adapter:  # a full-type last stage: its transformer is the whole model
        return Release(trial, final, final)
    return Release(trial, final, stages[-2] if len(stages) > 1 else None)


def release_for(trial_storage: str, sweep_id: str, trial: str) -> Release | None:
    return release_of(trial, stage_records(trial_storage, sweep_id, trial))


class BaseReferences:
    """Base references, checked once per checkpoint (hashing a 48 GB base twice buys nothing)."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, Any] | None] = {}

    def for_release(self, release: Release, model: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
        """The base reference (None: the preset) after verifying adapter and base; raises ValueError when a
        checkpoint is gone, pruned or does not hash as written (the reasons are appended to `problems`)."""
        if release.adapter is not None and usable_checkpoint(release.final.checkpoint, (ADAPTER,), problems) is None:
            raise ValueError(f"the adapter in {release.final.checkpoint} cannot be used")
        if release.base is None:
            if model.get("path") and not model.get("adapter"):
                key = f"path:{model['path']}"
                if key not in self._seen:
                    self._seen[key] = model_path_reference(model["path"])
                return self._seen[key]
            return None
        where = release.base.checkpoint
        if where not in self._seen:
            record = usable_checkpoint(where, (WEIGHTS,), problems)
            if record is None:
                raise ValueError(f"the base transformer in {where} cannot be used")
            self._seen[where] = checkpoint_reference(where, record)
        return self._seen[where]


def register_release(release: Release, reference: dict[str, Any] | None, register: Callable[..., str],
                     experiment: dict[str, Any], model_name: str, alias: str | None, metric: str, value: float,
                     sweep_id: str, place: str, run_id: str) -> str:
    """Register one release through `register` (`fluxtune.tracking.registry.register_adapter`)."""
    tags = {"sweep": sweep_id, "trial": release.trial, "cycle": release.final.cycle, "stage": release.final.stage,
            "search_metric": metric,
            "base_model": str(experiment["model"].get("path") or experiment["model"].get("preset"))}
    how = (f'mlflow.pyfunc.load_model("models:/{model_name}/<version>").predict(pandas.DataFrame('
           '{"image": [png_path_or_base64], "mask": [...], "prompt": [...]}), params={"steps": 8, "seed": 0})')
    where = (reference or {}).get("checkpoint") or (reference or {}).get("model_path") or "rebuilt from the preset"
    description = (f"Inpainting model from sweep {sweep_id}, trial {release.trial} ({place}): {metric}={value:.6g}. "
                   f"Last stage: {release.final.stage} (cycle {release.final.cycle}); "
                   f"{'LoRA adapter on ' if release.adapter else ''}base transformer {where}"
                   f" (referenced with its content hashes, not copied: the version stops loading if it is deleted)."
                   f" Load: {how}")
    with contextlib.ExitStack() as local:  # an adapter on a shared URI is downloaded for the upload
        adapter_dir = (local.enter_context(storage.local_copy(storage.join(release.final.checkpoint, ADAPTER)))
                       if release.adapter else None)
        return register(run_id, model_name, alias, adapter_dir, reference, experiment["model"], tags, description)


@dataclass
class Published:
    best: dict[str, Any] | None = None  # the best publishable trial's row
    best_yaml: str | None = None
    model_name: str | None = None
    model_version: str | None = None  # the best trial's version (registered now or by an earlier run)


def publish_sweep(rows: list[dict[str, Any]], spec: Any, record: Any, tracker: Any, trial_storage: str,
                  experiment_of: Callable[[dict[str, Any]], dict[str, Any]], warn: Callable[[str], None]
                  ) -> Published:
    """best.yaml for the best publishable trial; the best `register_top` registered (the best with the alias).
    Every registered version's checkpoints are pinned in the record (retention never prunes them)."""
    from fluxtune.search.best import write_best_yaml
    from fluxtune.tracking.registry import register_adapter

    search = spec.search
    order = ranked(rows, search.metric, search.mode)
    out = Published()
    if not order:
        return out
    out.best = best = order[0]
    out.best_yaml = str(write_best_yaml(SweepLayout.at(record.folder).best_yaml, spec, experiment_of(best["config"]),
                                        record.sweep_id, best["trial"], search.metric, best[search.metric]))
    name = spec.tracking.register_as or spec.name
    references = BaseReferences()
    for place, row in enumerate(order[:spec.tracking.register_top]):
        if row["trial"] in record.registered:  # an extension that found no better trial: already there
            if place == 0:
                out.model_name, out.model_version = record.registered[row["trial"]]
            continue
        release = release_for(trial_storage, record.sweep_id, row["trial"])
        if release is None:
            warn(f"trial {row['trial']} is not registered: it left no complete stage checkpoint")
            continue
        if not tracker.flush():  # MLflow is down: a later --more registers it
            warn(f"MLflow at {tracker.uri} is unreachable: trial {row['trial']} is not registered")
            continue
        experiment = experiment_of(row["config"])
        problems: list[str] = []
        try:
            reference = references.for_release(release, experiment["model"], problems)
        except ValueError as exc:
            warn(f"trial {row['trial']} is not registered: {'; '.join(problems) or exc}")
            continue
        run_id = tracker.trial_runs.get(row["trial"]) or tracker.find_trial_run(row["trial"])
        version = register_release(
            release, reference, lambda *args: register_adapter(tracker.uri, *args), experiment, name,
            spec.tracking.alias if place == 0 else None, search.metric, row[search.metric], record.sweep_id,
            "best" if place == 0 else f"rank {place + 1}", run_id)
        record.registered[row["trial"]] = [name, version]
        if reference is not None and reference.get("checkpoint"):  # the version loads its base from there
            record.pinned = sorted(set(record.pinned) | {reference["checkpoint"]})
        record.save()
        if place == 0:
            out.model_name, out.model_version = name, version
    return out


def mark_failed(tracker: Any, trial_id: str, reason: str) -> None:
    """A diverged trial's MLflow run: FAILED, with the reason (Tune ended it as a stopped trial)."""
    from fluxtune.tracking.buffer import TrackingOffline
    from fluxtune.tracking.runs import NOTE_TAG, STATUS_TAG, STOPPED_AT_TAG, STOPPED_BY_TAG

    run_id = tracker.trial_runs.get(trial_id) or tracker.find_trial_run(trial_id)
    if run_id is None:
        return
    tracker.client.update_run(run_id, status="FAILED")
    tracker.client.set_tag(run_id, "fluxtune.failure", reason)
    tracker.client.set_tag(run_id, STATUS_TAG, "failed")
    try:
        tags = tracker.client.get_run(run_id).data.tags
        if tags.get(STOPPED_BY_TAG):  # Tune ended it as a stopped trial: no scheduler stopped it early
            for key in (STOPPED_BY_TAG, STOPPED_AT_TAG, NOTE_TAG):
                if key in tags:
                    tracker.client.delete_tag(run_id, key)
    except TrackingOffline:  # MLflow is down: the status and the reason are buffered, that is what matters
        pass
