"""Stage checkpoints: the consolidated transformer (safetensors) + what the stage exported + progress.

Written into a fresh folder and completed by `progress.json` last, so a folder without it is never resumed from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROGRESS = "progress.json"


@dataclass(frozen=True)
class Progress:
    """Where a trial stands: the next stage to run is (cycle, stage_index)."""

    cycle: int = 0
    stage_index: int = 0
    global_step: int = 0

    def after(self, stage_index: int, n_stages: int, steps: int) -> "Progress":
        nxt = stage_index + 1
        if nxt == n_stages:
            return Progress(self.cycle + 1, 0, self.global_step + steps)
        return Progress(self.cycle, nxt, self.global_step + steps)


def write_stage_checkpoint(out_dir: Path, transformer: Any, progress: Progress, stage: str,
                           export_dir: Path | None, metrics: dict[str, float]) -> Path:
    out_dir = Path(out_dir)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    if export_dir is not None and export_dir.exists() and any(export_dir.iterdir()):
        shutil.copytree(export_dir, out_dir / "exports")
    record = {**asdict(progress), "finished_stage": stage, "metrics": metrics}
    (out_dir / PROGRESS).write_text(json.dumps(record, indent=1))
    return out_dir


def read_progress(checkpoint_dir: Path) -> Progress | None:
    path = Path(checkpoint_dir) / PROGRESS
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return Progress(record["cycle"], record["stage_index"], record["global_step"])
