"""One process per sweep folder, and one sweep per local store.

A sweep holds an exclusive lock on its folder (`runs/<sweep>/.lock`) for as long as it runs, so a second
`--resume` of a running sweep is refused instead of training the same trials twice. A sweep on a local sqlite
store (the default `mlflow/mlflow.db`, and the Optuna study's `optuna.db`) also holds a lock on each such file:
sqlite takes one writer at a time, and two sweeps writing it would fail mid-run with a locked database or an
integrity error. The second sweep is refused at once, with one line naming the sweep and pid that hold the
store (chosen over waiting: a sweep can hold a store for hours). A remote MLflow server needs no lock.

The locks are `flock`s: the kernel drops them when their process ends, however it ends (a SIGKILLed driver
leaves no stale lock). Each lock file says who holds it, for the message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterable

from fluxtune.config.errors import InputError
from fluxtune.train.protocol import SweepLayout


class Locks:
    """The locks this process holds; `release()` (or process exit) lets them go."""

    def __init__(self) -> None:
        self._held: list[tuple[Path, int]] = []

    def take(self, path: Path, holder: dict[str, str], refused: str, spec_file: str, key: str) -> None:
        """Lock `path` or raise an InputError: `refused` with `{holder}` (the sweep, pid and host holding it)
        and `{pid}` filled in."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            found = _holder(path)
            who = (f"sweep {found['sweep']}, " if found.get("sweep") else "") + \
                f"pid {found.get('pid', 'unknown')} on {found.get('host', 'this host')}"
            raise InputError.single(spec_file, refused.format(holder=who, pid=found.get("pid", "unknown"), lock=path),
                                    key=key) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**holder, "pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._held.append((path, fd))

    def release(self) -> None:
        while self._held:
            _, fd = self._held.pop()
            os.close(fd)  # closing drops the flock; the file stays (removing it would race a new holder)


def lock_sweep(locks: Locks, folder: Path, sweep_id: str, spec_file: str) -> None:
    locks.take(SweepLayout.at(folder).lock, {"sweep": sweep_id},
               f"sweep {sweep_id} is already running in pid {{pid}} (lock {{lock}}): wait for it or stop it first",
               spec_file, "name")


def lock_stores(locks: Locks, urls: Iterable[str], sweep_id: str, spec_file: str) -> None:
    """A lock beside each local sqlite database among `urls` (MLflow tracking URI, Optuna storage URL)."""
    for db in sorted({p for p in (sqlite_path(u) for u in urls) if p is not None}):
        locks.take(db.with_name(db.name + ".lock"), {"sweep": sweep_id},
                   f"the store {db} is in use by {{holder}}: sqlite takes one sweep at a time; wait for it, or "
                   "give this sweep its own store (tracking.uri, or an MLflow server)", spec_file, "tracking.uri")


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///…` URL (MLflow and SQLAlchemy spelling), else None."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def _holder(path: Path) -> dict[str, str]:
    try:
        found = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):  # written a moment ago by a holder that has not finished writing it
        found = {}
    return found if isinstance(found, dict) else {}
