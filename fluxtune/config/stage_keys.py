"""Content keys of a trial's stages, for stage reuse.

Two trials that would run an identical stage on identical inputs share its key: the hash of everything
that shapes the weights up to and including that stage (model, data identity, seed, loss, timesteps,
workers, plugins, and the exact stages run so far in schedule order). Keys that only describe later
stages (`cycles`, the rest of the schedule) or resources (`cpus_per_worker`) are left out, so a
LoRA-only search over one full fine-tune shares the full stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fluxtune.config.schedule import plan

_NOT_WEIGHT_SHAPING = {"cycles", "stages", "schedule", "schedules", "cpus_per_worker"}


def data_identity(jsonl: str) -> dict[str, Any]:
    """A data file by path, size and modification time; a latent-cache folder by its (content-keyed) path."""
    if os.path.isdir(jsonl):
        return {"folder": os.path.abspath(jsonl)}  # its mtime moves whenever a reader adds a lock file
    try:
        stat = os.stat(jsonl)
        return {"jsonl": jsonl, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:  # a URI: its path is all we know
        return {"jsonl": jsonl}


def stage_keys(experiment: dict[str, Any], data: dict[str, Any], plugins: dict[str, str]) -> list[dict[str, Any]]:
    """[{cycle, index, stage, key}] for every stage the experiment runs, in order."""
    common = {k: v for k, v in experiment.items() if k not in _NOT_WEIGHT_SHAPING}
    common.update(data_identity=data, plugins=plugins, gpu=experiment.get("gpus_per_worker", 0) > 0)
    prefix: list[Any] = []
    out = []
    for cycle, index, stage in plan(experiment):
        prefix.append([cycle, index, stage])
        text = json.dumps({"common": common, "prefix": prefix}, sort_keys=True, default=str)
        out.append({"cycle": cycle, "index": index, "stage": stage["name"],
                    "key": hashlib.sha256(text.encode()).hexdigest()[:32]})
    return out
