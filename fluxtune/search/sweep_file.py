"""`runs/<sweep>/sweep.json`: what a sweep is, how far it got, and every trial so far, so it can be resumed
(`--resume`: the latest unfinished sweep of that name) or extended (`--more N`: the latest finished one).

Sweep ids carry a random suffix, so two sweeps started in the same second never share a folder. The file is
written atomically (a unique temporary file, fsync, rename); a `sweep.json` that is not one of ours (corrupt,
cut short, another tool's) is skipped with a warning, never a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxtune.config.errors import InputError
from fluxtune.train.protocol import SweepLayout

STATUSES = ("running", "interrupted", "finished")
log = logging.getLogger("fluxtune.sweep")


def fingerprint(spec: Any, base: dict[str, Any]) -> str:
    """What must not change between a sweep and its resumption: the base and the space (not the sample count,
    concurrency or retry budget)."""
    search = (spec.search.model_dump(mode="json", exclude={"num_samples", "max_concurrent", "max_failures"})
              if spec.search else None)
    text = json.dumps({"base": base, "search": search}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SweepFile:
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
    pinned: list[str] = field(default_factory=list)  # checkpoints registered versions reference: never pruned
    ray_sessions: list[dict[str, Any]] = field(default_factory=list)  # local clusters it ran on (LocalRay.describe)
    stopped_by: str = ""  # why the last run stopped early (a storage fault), for the next --resume to show
    created: float = field(default_factory=time.time)

    @classmethod
    def new(cls, root: Path, name: str, fp: str) -> "SweepFile":
        sweep_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        return cls(name=name, sweep_id=sweep_id, folder=str(root / sweep_id), fingerprint=fp)

    @classmethod
    def load(cls, path: Path) -> "SweepFile | None":
        """The sweep file at `path`, or None with one warning when it is not a readable fluxtune sweep file."""
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(data, dict) or not set(data) <= known:
                raise ValueError(f"unknown keys {sorted(set(data) - known) if isinstance(data, dict) else data}")
            sweep_file = cls(**data)
            if not (isinstance(sweep_file.name, str) and isinstance(sweep_file.sweep_id, str)
                    and sweep_file.status in STATUSES and isinstance(sweep_file.tune_runs, list)
                    and isinstance(sweep_file.trials, dict) and isinstance(sweep_file.created, (int, float))):
                raise ValueError("fields of the wrong type")
        except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            log.warning("skipping %s: not a readable fluxtune sweep file (%s)", path, str(exc)[:200])
            return None
        sweep_file.folder = str(path.parent)  # where it is now, whatever it says (a moved or copied folder)
        return sweep_file

    @classmethod
    def all_of(cls, root: Path, name: str) -> list["SweepFile"]:
        found = (cls.load(p) for p in sorted(root.glob(f"*/{SweepLayout.SWEEP_JSON}")))
        sweep_files = [r for r in found if r is not None]
        return sorted((r for r in sweep_files if r.name == name), key=lambda r: r.created)

    @classmethod
    def to_continue(cls, root: Path, name: str, finished: bool, fp: str, spec_file: str) -> "SweepFile":
        """The latest unfinished (`--resume`) or finished (`--more`) sweep of `name`, with an unchanged spec."""
        wanted = "finished" if finished else "unfinished"
        every = cls.all_of(root, name)
        # An unfinished sweep that never got to start Tune has nothing to resume.
        found = [r for r in every if (r.status == "finished") == finished and r.tune_runs]
        if not found:
            hint = "run it without --more first" if finished else "nothing to resume; run it without --resume"
            if every:
                latest = every[-1]
                hint = (f"the latest sweep {latest.sweep_id} is {latest.status}: use "
                        f"{'--resume' if finished else '--more N'}")
            raise InputError.single(spec_file, f"no {wanted} sweep named {name!r} under {root} ({hint})", key="name")
        sweep_file = found[-1]
        if sweep_file.fingerprint != fp:
            raise InputError.single(spec_file, f"the base or search space changed since sweep {sweep_file.sweep_id} "
                                    "started; a changed space is a new sweep (run it without --resume/--more)",
                                    key="search")
        return sweep_file

    @property
    def path(self) -> Path:
        return SweepLayout.at(self.folder).sweep_json

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(asdict(self), indent=1, default=str))

    def save_quietly(self) -> None:
        """After a storage fault: a sweep file that cannot be saved still says `running` on disk, which `--resume`
        continues as well."""
        try:
            self.save()
        except OSError:
            pass


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of either; nothing is left behind on failure."""
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
