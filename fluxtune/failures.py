"""What failed, where, and where the whole story is kept. Ray-free and import-light.

Worker side: the cycle runs each stage inside `failure_site(...)`; an exception leaving it carries a note
naming the stage, cycle, step and the registered component whose code raised (with its plugin's
`distribution==version`). The note is one marked JSON line, so it survives Ray's wrapping of worker errors into
the trial's error text. Driver side: `TrialFailure.from_text` reads it back, `trial_failure_line` is the one
console line, and `keep_text` saves the full (redacted) error where it outlives the command.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fluxtune.train.protocol import SweepLayout

MARKER = "fluxtune-failure: "
_error_home: Path | None = None  # the running sweep's folder, once there is one


def keep_errors_in(folder: str | os.PathLike | None) -> None:
    """Tracebacks of this process go to `folder`/errors (a sweep's folder) instead of the cache."""
    global _error_home
    _error_home = Path(folder) if folder else None


def errors_folder() -> Path:
    """The running sweep's `errors/`, else `$FLUXTUNE_CACHE/errors` (default ~/.cache/fluxtune/errors)."""
    if _error_home is not None:
        return SweepLayout.at(_error_home).errors
    cache = os.environ.get("FLUXTUNE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "fluxtune") / SweepLayout.ERRORS


def keep_text(text: str, name: str, folder: Path | None = None) -> Path | None:
    """Write `text`, secrets redacted, to `folder` (default `errors_folder()`) as `name`; None if that fails."""
    from fluxtune.redact import redact_text

    folder = folder or errors_folder()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "error"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / safe
        path.write_text(redact_text(text))
        return path
    except OSError:  # a full or read-only disk must not hide the error itself
        return None


def keep_traceback(exc: BaseException, command: str) -> Path | None:
    """The full traceback of an unexpected error, kept as `<time>-<command>.txt`."""
    text = "".join(traceback.format_exception(exc))
    return keep_text(text, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{command}.txt")


def exception_line(exc: BaseException) -> str:
    """`ValueError: the first line of its message`, at most 300 characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300].rstrip(": ")


@dataclass
class FailureSite:
    """Where in a trial's cycle an exception left: stage, cycle, step, and the component whose code raised."""

    stage: str
    cycle: int
    phase: str = "start"  # start | training | stage end
    step: int | None = None  # the global step being trained when it raised (training), else the last one done
    component: str = ""
    error: str = ""

    def where(self) -> str:
        step = ("" if self.step is None else f" step {self.step}" if self.phase == "training"
                else f" after step {self.step}")
        phase = {"training": "", "start": " stage start", "stage end": " stage end"}.get(self.phase, f" {self.phase}")
        return f"stage {self.stage!r} cycle {self.cycle}{phase}{step}"

    def note(self) -> str:
        return MARKER + json.dumps(asdict(self), sort_keys=True)


def describe_entry(entry: Any) -> str:
    """`loss 'focal' of plugin 'focal' (fluxtune-focal==1.0)`, or `stage 'full' (built-in, fluxtune==0.1.0)`."""
    who = entry.provenance
    if who.distribution == "fluxtune":
        return f"{entry.kind} {entry.name!r} (built-in, fluxtune=={who.version})"
    return f"{entry.kind} {entry.name!r} of plugin {who.plugin!r} ({who.distribution}=={who.version})"


def _module_of(entry: Any) -> str:
    return getattr(entry.factory, "__module__", None) or ""


def _owns(module: str, frame_module: str) -> bool:
    """A frame belongs to a component when it runs in the component's module or, for a plugin package outside
    fluxtune, anywhere in that package (its helpers)."""
    if not module:
        return False
    if frame_module == module or frame_module.startswith(module + "."):
        return True
    package = module.split(".")[0]
    return package != "fluxtune" and frame_module.split(".")[0] == package


def raising_component(exc: BaseException, entries: list[Any]) -> Any | None:
    """The entry whose code is innermost in the traceback of `exc` (the one that raised), or None."""
    frames = [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame_module in reversed(frames):
        for entry in entries:
            if _owns(_module_of(entry), frame_module):
                return entry
    return None


def configured_entries(experiment: dict[str, Any], stage: dict[str, Any], components: Any) -> list[Any]:
    """The registered components a stage runs: the stage first (the default culprit), then its adapter, the
    loss, the timestep sampler and the callbacks."""
    wanted = [("stage", stage.get("type"))]
    adapter = stage.get("adapter")
    if isinstance(adapter, dict):
        wanted.append(("adapter", adapter.get("type")))
    for kind, key in (("loss", "loss"), ("timestep_sampler", "timesteps")):
        if isinstance(experiment.get(key), dict):
            wanted.append((kind, experiment[key].get("type")))
    wanted += [("callback", spec.get("type")) for spec in experiment.get("callbacks", []) if isinstance(spec, dict)]
    entries = []
    for kind, name in wanted:
        try:
            entries.append(components.get(kind, name))
        except Exception:  # an unknown name was refused at validation; never let naming the culprit fail
            continue
    return entries


@dataclass
class StepMark:
    """A callback that remembers how many global steps are done (the cycle adds it to the callback list last,
    so a step whose own callbacks raise is not counted as done)."""

    step: int | None = None

    def on_step_end(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        self.step = ctx.first_global_step + step + 1  # `step` is the stage's 0-based index of the step just done


@contextmanager
def failure_site(site: FailureSite, entries: list[Any], mark: StepMark) -> Iterator[FailureSite]:
    """Attach `site` (with the step and the raising component filled in) to an exception that leaves the block.

    The innermost site wins: an exception that already carries one keeps it.
    """
    try:
        yield site
    except Exception as exc:
        if not any(note.startswith(MARKER) for note in getattr(exc, "__notes__", [])):
            if site.phase == "training":
                site.step = (mark.step if mark.step is not None else site.step or 0) + 1
            elif mark.step is not None:
                site.step = mark.step
            entry = raising_component(exc, entries) or (entries[0] if entries else None)
            site.component = describe_entry(entry) if entry is not None else "fluxtune"
            site.error = exception_line(exc)
            exc.add_note(site.note())
        raise


@dataclass
class TrialFailure:
    """What a failed trial's error text says: the site (when the cycle named one) and the exception line."""

    error: str
    site: FailureSite | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str) -> "TrialFailure":
        for line in reversed(text.splitlines()):
            _, found, payload = line.partition(MARKER)
            if found:
                try:
                    site = FailureSite(**json.loads(payload))
                except (ValueError, TypeError):
                    continue
                return cls(error=site.error, site=site)
        return cls(error=_last_exception_line(text))


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Stopped)\b.*)$")


def _last_exception_line(text: str) -> str:
    """The innermost `SomeError: message` of a traceback text (Ray's wrappers add their own lines after it)."""
    lines = [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line)]
    wrappers = ("ray.", "TuneError", "TrainingFailedError", "WorkerGroupError", "RayTaskError", "RayActorError")
    inner = [line for line in lines if not line.startswith(wrappers)]
    return ((inner or lines or ["see the error file"])[-1])[:300]


def trial_failure_detail(failure: TrialFailure, kept: str | None) -> str:
    """What follows "<trial> failed" on its console line: where, who, what, and where the full error is."""
    where = f" in {failure.site.where()}" if failure.site else ""
    by = f", raised by {failure.site.component}" if failure.site and failure.site.component else ""
    full = f" (full error: {kept})" if kept else ""
    return f"{where}{by}: {failure.error}{full}"


def trial_failure_line(trial_id: str, failure: TrialFailure, kept: str | None) -> str:
    """The one console line of a failed trial: which, where, what, and where the full error is."""
    return f"trial {trial_id} failed{trial_failure_detail(failure, kept)}"


def trial_error_text(trial: Any) -> str:
    """A Tune trial's error text: its local error file while the driver runs, else the copy in its storage."""
    for path in (getattr(trial, "error_file", None),):
        if path:
            try:
                with open(path, errors="replace") as handle:
                    return handle.read()
            except OSError:
                pass
    try:
        return trial.get_error() or ""
    except Exception:  # storage gone or unreadable: the console line says so instead of failing the sweep
        return ""


def keep_trial_failure(trial: Any, sweep_folder: str | os.PathLike | None) -> tuple[TrialFailure, Path | None]:
    """Read a failed trial's error, keep it as `<sweep folder>/errors/trial-<id>.txt`; the parsed failure."""
    text = trial_error_text(trial)
    failure = TrialFailure.from_text(text)
    folder = SweepLayout.at(sweep_folder).errors if sweep_folder else None
    kept = keep_text(text or failure.error, f"trial-{trial.trial_id}.txt", folder) if text or folder else None
    return failure, kept


def redact_text(text: str) -> str:
    """Secrets out of a line bound for the console or MLflow (see fluxtune.redact)."""
    from fluxtune.redact import redact_text as redact

    return redact(text)


class _DropTrialTracebacks:
    """Drops Tune's "Trial task failed" log record (a long traceback): the sweep prints its own line."""

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith("Trial task failed for trial")


def quiet_trial_tracebacks() -> None:
    import logging

    tune_logger = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _DropTrialTracebacks) for f in tune_logger.filters):
        tune_logger.addFilter(_DropTrialTracebacks())
