"""What a sweep leaves for people: the best configuration as a runnable YAML, and a trial's stage checkpoints.

Stage checkpoints are read from disk (each holds `progress.json`), not from callback memory, so a resumed or
extended sweep finds trials that finished in an earlier process, and a trial that reused a stage prefix
finds the reused checkpoint first.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from fluxtune import storage
from fluxtune.checkpoints import read_checkpoint_record


@dataclass(frozen=True)
class StageCheckpoint:
    stage: str
    cycle: int
    global_step: int
    checkpoint: str


def _read(folder: str) -> StageCheckpoint | None:
    record = read_checkpoint_record(folder)  # None for a half-written or half-copied one (storage faults)
    if record is None:
        return None
    finished_cycle = record["cycle"] if record["stage_index"] > 0 else record["cycle"] - 1
    return StageCheckpoint(record["finished_stage"], finished_cycle, record["global_step"], str(folder))


def stage_records(trial_storage: str, sweep_id: str, trial_id: str) -> list[StageCheckpoint]:
    """The trial's finished stages in order: a reused prefix (if any), then its own Train checkpoints.
    `trial_storage` is the sweep's Ray storage: a local folder or a shared URI."""
    found: list[StageCheckpoint] = []
    used = storage.read_json(storage.join(str(trial_storage), "stage_cache", "used", f"{trial_id}.json"))
    if used is not None:
        reused = _read(used["checkpoint"])
        if reused is not None:
            found.append(reused)
    run = storage.join(str(trial_storage), "train", f"{sweep_id}-{trial_id}")
    own = [c for c in (_read(p) for p in storage.list_folders(run, "checkpoint")) if c is not None]
    found.extend(sorted(own, key=lambda c: c.global_step))
    return found


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
    path.write_text(header + buffer.getvalue())
    return path
