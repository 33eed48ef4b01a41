"""Writes to an MLflow tracking server that outlive the server going away for a while.

`BufferedClient` stands in for `MlflowClient` in the sweep driver. While the server answers, writes go straight
through. When one fails and the server's /health does not answer, that write and every later one is kept, in
order, in memory and in a JSONL spill file (images as PNG files beside it), one warning is printed, and the
queue is replayed in order once the server answers again (tried at most every RETRY_EVERY_S, on later writes
and at the end of the sweep). A run created while the server is down gets a placeholder id, replaced by the
real one when its creation is replayed. Reads while down raise `TrackingOffline`, which callers treat as
"unknown"; a new driver (a resumed sweep) replays a spill file an earlier one left.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

from fluxtune.tracking.store import unreachable

RETRY_EVERY_S = 5.0
PROBE_TIMEOUT_S = 2.0
SPILL_NAME = "mlflow-unlogged.jsonl"
# MLflow's default is 7 retries with growing back-off (minutes per call while a server is down): two
# immediate retries, then this buffer takes over (it retries every RETRY_EVERY_S). The driver must not stall:
# Tune's callbacks run in its event loop. A user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PLACEHOLDER = "pending-"


class TrackingOffline(RuntimeError):
    """The tracking server is down; the answer to this read is unknown for now."""


class BufferedClient:
    def __init__(self, client: Any, uri: str, spill_dir: Path | None = None,
                 handlers: dict[str, Callable[..., Any]] | None = None,
                 on_run_created: Callable[[str, str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)  # read by MLflow at each request
        self.client, self.uri = client, uri
        self.handlers = handlers or {}  # deferred caller-side work by name, e.g. drawing curves from history
        self.on_run_created = on_run_created or (lambda placeholder, run_id: None)
        self.warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
        self.spill = Path(spill_dir) / SPILL_NAME if spill_dir else None
        self.pending: deque[dict[str, Any]] = deque()
        self.ids: dict[str, str] = {}  # placeholder → real run id
        self._next_try = 0.0
        self._reads_down_until = 0.0
        self._reason = "no answer"  # the last failure seen, for the warning
        self._replaying = False  # a replayed handler's own reads and writes go straight to the server
        self._images = 0
        if self.spill is not None and self.spill.exists():
            self.pending.extend(json.loads(line) for line in self.spill.read_text().splitlines() if line.strip())
            if self.pending:
                self.warn(f"{len(self.pending)} MLflow calls an earlier driver could not log are in {self.spill}: "
                          f"sending them to {uri}")

    # -- the MlflowClient calls fluxtune makes (same arguments). Writes go through while the server answers and
    # are buffered in order while it does not; reads raise TrackingOffline while it does not.
    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        """A placeholder run (its `info.run_id` stands in until the creation is replayed) while down."""
        return self._write("create_run", args, kwargs)

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_batch", args, kwargs)

    def set_tag(self, *args: Any, **kwargs: Any) -> None:
        self._write("set_tag", args, kwargs)

    def delete_tag(self, *args: Any, **kwargs: Any) -> None:
        self._write("delete_tag", args, kwargs)

    def update_run(self, *args: Any, **kwargs: Any) -> None:
        self._write("update_run", args, kwargs)

    def set_terminated(self, *args: Any, **kwargs: Any) -> None:
        self._write("set_terminated", args, kwargs)

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_artifact", args, kwargs)

    def log_artifacts(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_artifacts", args, kwargs)

    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_image", args, kwargs)

    def log_figure(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_figure", args, kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._write("log_table", args, kwargs)

    def get_run(self, *args: Any, **kwargs: Any) -> Any:
        return self._read(self.client.get_run, args, kwargs)

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        return self._read(self.client.search_runs, args, kwargs)

    def get_metric_history(self, *args: Any, **kwargs: Any) -> Any:
        return self._read(self.client.get_metric_history, args, kwargs)

    def defer(self, handler: str, *args: Any) -> None:
        """Run `self.handlers[handler](*args)` now, or in order after the buffered writes once the server is back."""
        if self.pending and not self.retry():
            self._enqueue({"op": handler, "args": list(args), "kwargs": {}})
            return
        try:
            self.handlers[handler](*self._resolve(list(args)))
        except TrackingOffline as exc:
            self._enqueue({"op": handler, "args": list(args), "kwargs": {}}, str(exc))

    # -- state
    def retry(self, force: bool = False) -> bool:
        """Replay the buffered calls if the server answers; True when nothing is left buffered."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        self._next_try = time.monotonic() + RETRY_EVERY_S
        if unreachable(self.uri, PROBE_TIMEOUT_S, healthy=True):
            return False
        sent = Counter()
        while self.pending:
            op = self.pending[0]
            try:
                self._replaying = True
                result = self._replay(op)
            except Exception as exc:
                if self._outage(exc):
                    self._rewrite_spill()
                    return False
                self.warn(f"MLflow refused a buffered {op['op']} ({exc}); dropped it")
                result = None
            finally:
                self._replaying = False
            if op["op"] == "create_run" and result is not None:
                self.ids[op["placeholder"]] = result.info.run_id
                self.on_run_created(op["placeholder"], result.info.run_id)
            sent.update(_kinds(op))
            self.pending.popleft()
        self._rewrite_spill()
        self.warn(f"MLflow at {self.uri} answers again: logged {_describe(sent)} that were buffered")
        return True

    def close(self) -> bool:
        """At the end of a sweep: a last replay; if the server is still down, say exactly what is not logged."""
        if self.retry(force=True):
            return True
        what = Counter()
        for op in self.pending:
            what.update(_kinds(op))
        self.warn(f"MLflow at {self.uri} is still unreachable: not logged: {_describe(what)} (metric names: "
                  f"{', '.join(_metric_names(self.pending)) or 'none'}). They are kept in "
                  f"{self.spill or 'memory only (no sweep folder)'}"
                  + (" and are sent when this sweep runs again (--resume or --more)." if self.spill else "."))
        return False

    # -- internals
    def _write(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._replaying:
            return getattr(self.client, name)(*self._resolve(list(args)), **self._resolve(kwargs))
        if not self.pending or self.retry():
            try:
                return getattr(self.client, name)(*self._resolve(list(args)), **self._resolve(kwargs))
            except Exception as exc:
                if not self._outage(exc):
                    raise
                op = self._encode(name, args, kwargs)
                self._enqueue(op, _short(exc))
                return _placeholder_run(op) if name == "create_run" else None
        op = self._encode(name, args, kwargs)
        self._enqueue(op)
        return _placeholder_run(op) if name == "create_run" else None

    def _read(self, method: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self._replaying and ((self.pending and not self.retry()) or time.monotonic() < self._reads_down_until):
            raise TrackingOffline(self._reason)
        try:
            return method(*self._resolve(list(args)), **self._resolve(kwargs))
        except Exception as exc:
            if self._outage(exc):
                self._reads_down_until = time.monotonic() + RETRY_EVERY_S  # the next reads answer at once
                self._reason = _short(exc)
                raise TrackingOffline(self._reason) from exc
            raise

    def _outage(self, exc: Exception) -> bool:
        """A transport failure, or any failure while /health does not say OK (a server going down, or
        something else on its port); a failure while it does is a refused request, raised as before."""
        if isinstance(exc, TrackingOffline):
            return True
        text = str(exc)
        return ("failed with exception" in text or "Max retries exceeded" in text
                or unreachable(self.uri, PROBE_TIMEOUT_S, healthy=True) is not None)

    def _encode(self, name: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time() * 1000)
        args, kwargs = list(args), dict(kwargs)
        if name == "log_figure":  # a PNG file now, uploaded as that file later
            run_id, figure, artifact_file = args[0], args[1], args[2] if len(args) > 2 else kwargs["artifact_file"]
            png = self._image_path(Path(artifact_file).name)
            figure.savefig(png)
            return {"op": "log_artifact", "args": [run_id, str(png), str(Path(artifact_file).parent) or None],
                    "kwargs": {}}
        if name == "log_image":
            png = self._image_path("image.png")
            args[1].save(png)
            args[1] = {"__png__": str(png)}
            if kwargs.get("key") is not None:
                kwargs.setdefault("timestamp", now)  # the slider shows when it was made, not when it was sent
        if name in ("log_artifact", "log_artifacts"):
            args[1] = self._keep(Path(args[1]))
        if name == "log_batch":  # by keyword, so the warnings can count what it carries
            kwargs.update(zip(("metrics", "params", "tags"), args[1:]))
            args = args[:1]
        if name in ("set_terminated", "create_run"):  # the run shows when it really ended / started
            kwargs.setdefault("end_time" if name == "set_terminated" else "start_time", now)
        op = {"op": name, "args": [_to_json(a) for a in args], "kwargs": {k: _to_json(v) for k, v in kwargs.items()}}
        if name == "create_run":
            op["placeholder"] = f"{PLACEHOLDER}{uuid.uuid4().hex}"
        return op

    def _replay(self, op: dict[str, Any]) -> Any:
        args, kwargs = self._resolve(op["args"]), self._resolve(op["kwargs"])
        if op["op"] in self.handlers:
            return self.handlers[op["op"]](*args)
        args = [_from_json(a) for a in args]
        kwargs = {k: _from_json(v) for k, v in kwargs.items()}
        return getattr(self.client, op["op"])(*args, **kwargs)

    def _enqueue(self, op: dict[str, Any], reason: str = "") -> None:
        first = not self.pending
        self.pending.append(op)
        if self.spill is not None:  # appended as it comes: a driver that dies loses nothing already buffered
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill, "a") as handle:
                handle.write(json.dumps(op, default=str) + "\n")
        if first:  # the first call an outage holds back (already on disk when the warning names the file)
            self.warn(f"MLflow at {self.uri} unreachable ({reason or 'no answer'}): buffering {_describe(_kinds(op))}; "
                      f"will retry every {RETRY_EVERY_S:g} s and at the end of the sweep"
                      + (f"; kept in {self.spill}" if self.spill else ""))

    def _rewrite_spill(self) -> None:
        if self.spill is None:
            return
        if not self.pending:
            self.spill.unlink(missing_ok=True)
            shutil.rmtree(self._files(), ignore_errors=True)
            return
        part = self.spill.with_name(self.spill.name + ".part")
        part.write_text("".join(json.dumps(self._resolve(op), default=str) + "\n" for op in self.pending))
        os.replace(part, self.spill)

    def _resolve(self, value: Any) -> Any:
        """Placeholder run ids → the real ones, wherever they appear (run ids, parent-run tags)."""
        if isinstance(value, str):
            return self.ids.get(value, value)
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value

    def _files(self) -> Path:
        return self.spill.with_suffix(".files") if self.spill else Path(tempfile.gettempdir()) / f"fluxtune-{id(self)}"

    def _image_path(self, name: str) -> Path:
        self._images += 1
        folder = self._files() / f"{self._images:06d}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        return folder / name

    def _keep(self, path: Path) -> str:
        """A temporary file or folder (a download) is copied beside the spill file; others stay where they are."""
        if not str(path.resolve()).startswith(tempfile.gettempdir() + os.sep) or not path.exists():
            return str(path)
        copy = self._image_path(path.name)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
        return str(copy)


def _placeholder_run(op: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(run_id=op["placeholder"]))


def _to_json(value: Any) -> Any:
    from mlflow.entities import Metric, Param, RunTag

    if isinstance(value, Metric):
        return {"__metric__": [value.key, value.value, value.timestamp, value.step]}
    if isinstance(value, Param):
        return {"__param__": [value.key, value.value]}
    if isinstance(value, RunTag):
        return {"__tag__": [value.key, value.value]}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    from mlflow.entities import Metric, Param, RunTag

    if isinstance(value, dict):
        if "__metric__" in value:
            return Metric(*value["__metric__"])
        if "__param__" in value:
            return Param(*value["__param__"])
        if "__tag__" in value:
            return RunTag(*value["__tag__"])
        if "__png__" in value:
            from PIL import Image

            with Image.open(value["__png__"]) as image:
                return image.copy()
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _kinds(op: dict[str, Any]) -> Counter:
    """What one buffered call carries, counted for the warnings."""
    name, kwargs = op["op"], op["kwargs"]
    if name == "log_batch":
        return Counter({label: len(kwargs.get(kind) or ()) for kind, label in
                        (("metrics", "metric points"), ("params", "params"), ("tags", "tags")) if kwargs.get(kind)})
    labels = {"set_tag": "tags", "delete_tag": "tag deletions", "create_run": "runs created", "update_run": "run updates",
              "set_terminated": "run ends", "log_artifact": "artifacts", "log_artifacts": "artifact folders",
              "log_image": "images"}
    return Counter({labels.get(name, f"{name} calls"): 1})


def _metric_names(ops: Any) -> list[str]:
    names = set()
    for op in ops:
        if op["op"] == "log_batch":
            names.update(m["__metric__"][0] for m in op["kwargs"].get("metrics") or ())
    return sorted(names)


def _describe(counts: Counter) -> str:
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda item: -item[1])) or "nothing"


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for cause in ("Connection refused", "timed out", "Connection reset", "Name or service not known"):
        if cause in text:  # the root cause, not MLflow's and urllib3's wrappers around it
            return cause
    return text if len(text) < 160 else text[:157] + "..."
