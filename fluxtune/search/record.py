"""`runs/<sweep>/sweep.json`: what a sweep is, how far it got, and every trial so far, so it can be resumed
(`--resume`: the latest unfinished sweep of that name) or extended (`--more N`: the latest finished one).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxtune.config.errors import InputError

RECORD = "sweep.json"


def fingerprint(spec: Any, base: dict[str, Any]) -> str:
    """What must not change between a sweep and its resumption: the base and the space (not the sample count,
    concurrency or retry budget)."""
    search = (spec.search.model_dump(mode="json", exclude={"num_samples", "max_concurrent", "max_failures"})
              if spec.search else None)
    text = json.dumps({"base": base, "search": search}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SweepRecord:
    name: str
    sweep_id: str
    folder: str
    fingerprint: str
    status: str = "running"  # running | interrupted | finished
    tune_runs: list[str] = field(default_factory=list)  # Tune experiment folders, oldest first
    expected: dict[str, int] = field(default_factory=dict)  # Tune run → trials it should end with
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial id → summary row
    optuna_storage: str = ""
    registered: dict[str, list[str]] = field(default_factory=dict)  # trial id → [model name, version]
    ray_sessions: list[dict[str, Any]] = field(default_factory=list)  # local clusters it ran on (LocalRay.describe)
    created: float = field(default_factory=time.time)

    @classmethod
    def new(cls, root: Path, name: str, fp: str) -> "SweepRecord":
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cls(name=name, sweep_id=sweep_id, folder=str(root / sweep_id), fingerprint=fp)

    @classmethod
    def all_of(cls, root: Path, name: str) -> list["SweepRecord"]:
        records = []
        for path in root.glob(f"*/{RECORD}"):
            data = json.loads(path.read_text())
            if data.get("name") == name:
                records.append(cls(**data))
        return sorted(records, key=lambda r: r.created)

    @classmethod
    def to_continue(cls, root: Path, name: str, finished: bool, fp: str, spec_file: str) -> "SweepRecord":
        """The latest unfinished (`--resume`) or finished (`--more`) sweep of `name`, with an unchanged spec."""
        wanted = "finished" if finished else "unfinished"
        # An unfinished sweep that never got to start Tune has nothing to resume.
        found = [r for r in cls.all_of(root, name) if (r.status == "finished") == finished and r.tune_runs]
        if not found:
            hint = "run it without --more first" if finished else "nothing to resume; run it without --resume"
            others = [r for r in cls.all_of(root, name)]
            if others:
                latest = others[-1]
                hint = (f"the latest sweep {latest.sweep_id} is {latest.status}: use "
                        f"{'--resume' if finished else '--more N'}")
            raise InputError.single(spec_file, f"no {wanted} sweep named {name!r} under {root} ({hint})", key="name")
        record = found[-1]
        if record.fingerprint != fp:
            raise InputError.single(spec_file, f"the base or search space changed since sweep {record.sweep_id} "
                                    "started; a changed space is a new sweep (run it without --resume/--more)",
                                    key="search")
        return record

    @property
    def path(self) -> Path:
        return Path(self.folder) / RECORD

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        tmp.replace(self.path)  # a crash never leaves half a record
