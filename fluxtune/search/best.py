"""What a sweep leaves for people: the best configuration as a runnable YAML, and a trial's stage checkpoints.

Stage checkpoints are read from disk (each holds `progress.json`), not from callback memory, so a resumed or
extended sweep finds trials that finished in an earlier process, and a trial that reused a stage prefix
finds the reused checkpoint first. Reading a marker is cheap; the content hashes are checked only by whoever
is about to use a checkpoint (`fluxtune.checkpoints.usable_checkpoint`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from fluxtune import storage
from fluxtune.checkpoints import read_checkpoint_manifest, weights_pruned
from fluxtune.search.sweep_file import write_atomically
from fluxtune.train.protocol import SweepLayout
from fluxtune.version_contents import ADAPTER, Release, StageCheckpoint, release_of


def read_stage(folder: str) -> StageCheckpoint | None:
    manifest = read_checkpoint_manifest(folder)  # None for a half-written or half-copied one (storage faults)
    if manifest is None:
        return None
    finished_cycle = manifest["cycle"] if manifest["stage_index"] > 0 else manifest["cycle"] - 1
    adapter = any(name.startswith(ADAPTER + "/") for name in manifest.get("files", {}))
    return StageCheckpoint(manifest["finished_stage"], finished_cycle, manifest["global_step"], str(folder),
                           has_weights=not weights_pruned(manifest), has_adapter=adapter)


def finished_stages(trial_storage: str, sweep_id: str, trial_id: str) -> list[StageCheckpoint]:
    """The trial's finished stages in order: a reused prefix (if any), then its own Train checkpoints.
    `trial_storage` is the sweep's Ray storage: a local folder or a shared URI."""
    found: list[StageCheckpoint] = []
    layout = SweepLayout(sweep_id, str(trial_storage))
    used = storage.read_json(layout.reused_prefix(trial_id))
    if used is not None:
        reused = read_stage(used["checkpoint"])
        if reused is not None:
            found.append(reused)
    own = [c for c in (read_stage(p) for p in layout.checkpoints(layout.run(trial_id))) if c is not None]
    found.extend(sorted(own, key=lambda c: c.global_step))
    return found


def release_for(trial_storage: str, sweep_id: str, trial: str) -> Release | None:
    """The version the trial's stage checkpoints on disk make (`fluxtune.version_contents.Release`)."""
    return release_of(trial, finished_stages(trial_storage, sweep_id, trial))


def write_best_yaml(path: Path, spec: Any, experiment: dict[str, Any], sweep_id: str, trial_id: str,
                    metric: str, value: float) -> Path:
    """`best.yaml`: the best trial's complete experiment, which `fluxtune run` accepts as it is."""
    tracking = spec.tracking.model_dump(mode="json", exclude_none=True)
    document = {"version": 1, "name": f"{spec.name}-best", "base": experiment, "tracking": tracking}
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    header = (f"# The best configuration of sweep {sweep_id}: trial {trial_id}, {metric}={value:.6g}\n"
              f"# (written {time.strftime('%Y-%m-%d %H:%M:%S')}). Run it again with: fluxtune run {path}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, header + buffer.getvalue())
    return path
