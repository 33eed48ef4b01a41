"""What a finished sweep leaves in MLflow beyond its runs: the chosen trials as registered model versions, and the
verdict on a diverged trial's run.

The sweep decides which trials and in which order (`fluxtune.search.ranking`); here each is registered. A version is
made of the trial's last stage (`fluxtune.version_contents.Release`): its adapter, when that stage exported one,
on the transformer it was trained on, or else the final transformer itself. Both are checked against the hashes
their writer recorded before anything is registered; the base is referenced (stage checkpoint or model path, with
hashes), never copied. Every registered version's base checkpoint is pinned in the sweep file, so retention never
prunes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

from fluxtune import storage
from fluxtune.checkpoints import WEIGHTS, usable_checkpoint
from fluxtune.version_contents import ADAPTER, Release, checkpoint_reference, model_path_reference


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
            manifest = usable_checkpoint(where, (WEIGHTS,), problems)
            if manifest is None:
                raise ValueError(f"the base transformer in {where} cannot be used")
            self._seen[where] = checkpoint_reference(where, manifest)
        return self._seen[where]


def register_release(release: Release, reference: dict[str, Any] | None, register: Callable[..., str],
                     experiment: dict[str, Any], model_name: str, alias: str | None, metric: str, value: float,
                     sweep_id: str, place: str, run_id: str) -> str:
    """Register one release through `register` (`fluxtune.tracking.model_versions.register_adapter`)."""
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


@dataclass(frozen=True)
class Candidate:
    """A trial the sweep chose to register: its sweep-file row, and the version its checkpoints make (None: it left
    no complete stage checkpoint)."""

    row: dict[str, Any]
    release: Release | None


def register_versions(candidates: list[Candidate], tracker: Any, sweep_file: Any, model_name: str, alias: str | None,
                      metric: str, experiment_of: Callable[[dict[str, Any]], dict[str, Any]],
                      warn: Callable[[str], None]) -> tuple[str, str] | None:
    """Register `candidates` (best first; the first gets `alias`) as versions of `model_name`, each noted in the
    `sweep_file` (SweepFile: `registered`, `pinned`, saved after every version). A trial an earlier run registered
    stays as it is. Returns the first candidate's (model name, version), or None when it is not registered."""
    from fluxtune.tracking.model_versions import register_adapter

    references = BaseReferences()
    best: tuple[str, str] | None = None
    for place, candidate in enumerate(candidates):
        row, release = candidate.row, candidate.release
        trial = row["trial"]
        if trial in sweep_file.registered:  # an extension that found no better trial: already there
            if place == 0:
                best = (sweep_file.registered[trial][0], sweep_file.registered[trial][1])
            continue
        if release is None:
            warn(f"trial {trial} is not registered: it left no complete stage checkpoint")
            continue
        if not tracker.flush():  # MLflow is down: a later --more registers it
            warn(f"MLflow at {tracker.uri} is unreachable: trial {trial} is not registered")
            continue
        experiment = experiment_of(row["config"])
        problems: list[str] = []
        try:
            reference = references.for_release(release, experiment["model"], problems)
        except ValueError as exc:
            warn(f"trial {trial} is not registered: {'; '.join(problems) or exc}")
            continue
        run_id = tracker.trial_runs.get(trial) or tracker.find_trial_run(trial)
        version = register_release(
            release, reference, lambda *args: register_adapter(tracker.uri, *args), experiment, model_name,
            alias if place == 0 else None, metric, row[metric], sweep_file.sweep_id,
            "best" if place == 0 else f"rank {place + 1}", run_id)
        sweep_file.registered[trial] = [model_name, version]
        if reference is not None and reference.get("checkpoint"):  # the version loads its base from there
            sweep_file.pinned = sorted(set(sweep_file.pinned) | {reference["checkpoint"]})
        sweep_file.save()
        if place == 0:
            best = (model_name, version)
    return best


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
