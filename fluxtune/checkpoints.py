"""Stage checkpoints: the transformer's canonical fp32 weights (safetensors) + what the stage exported + progress.

Written atomically: everything goes into `<name>.tmp-<random>`, `progress.json` (the completion marker) last, and
the folder is then renamed to its final name. The marker lists every file with its size, so a reader also
rejects a folder that someone else copied half-way (Ray Train copies a reported checkpoint file by file into
storage, in no particular order): `read_checkpoint_record` is the one check every reader uses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from fluxtune import storage

PROGRESS = "progress.json"
_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# safetensors (Rust) reports I/O failures as "… I/O error: No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
log = logging.getLogger("fluxtune.checkpoints")


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


class CheckpointSpaceError(OSError):
    """The disk (or a file-size limit) ran out while writing a checkpoint; nothing half-written is left."""

    def __init__(self, folder: Path, needed: int, free: int, cause: str = ""):
        self.folder, self.needed, self.free = folder, needed, free
        why = f" ({cause})" if cause else ""
        super().__init__(errno.ENOSPC, f"no space to write stage checkpoint {folder}{why}: it needs about "
                                       f"{_mib(needed)}, {_mib(free)} free there; earlier checkpoints are untouched")


def write_stage_checkpoint(out_dir: Path, transformer: Any, progress: Progress, stage: str,
                           export_dir: Path | None, metrics: dict[str, float],
                           weights: Iterable[tuple[str, Any]] | None = None) -> Path:
    """`weights`: the canonical fp32 tensors in `fluxtune.canonical.layout(transformer)` order, streamed one at a
    time (a DeepSpeed gather, a merged LoRA); default the transformer's own values, which must then be fp32."""
    from fluxtune.canonical import FP32, LiveWeights, layout, save_weights_folder, weights_dtype

    if weights is None and weights_dtype(transformer) != FP32:
        raise ValueError("a checkpoint of a bf16 transformer needs its canonical fp32 weights (weights=…)")
    out_dir = Path(out_dir)
    has_exports = export_dir is not None and export_dir.exists() and any(export_dir.iterdir())
    needed = _layout_bytes(layout(transformer)) + (_folder_bytes(export_dir) if has_exports else 0)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if needed > free:  # refuse up front rather than fill the disk for other writers
        raise CheckpointSpaceError(out_dir, needed, free)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        save_weights_folder(tmp / "transformer", transformer,
                            weights if weights is not None else LiveWeights(transformer).tensors())
        if has_exports:
            shutil.copytree(export_dir, tmp / "exports")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {**asdict(progress), "finished_stage": stage, "metrics": metrics, "files": files}
        _write_atomically(tmp / PROGRESS, json.dumps(record, indent=1))
        os.replace(tmp, out_dir)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(exc):
            raise CheckpointSpaceError(out_dir, needed, shutil.disk_usage(out_dir.parent).free, str(exc)) from exc
        raise
    return out_dir


def read_checkpoint_record(checkpoint_dir: Path | str) -> dict[str, Any] | None:
    """The completion record of a finished checkpoint folder (a local path or a storage URI); None, with a
    warning, for anything incomplete: no marker, an unreadable one, a listed file missing or of another size."""
    import pyarrow.fs as pafs

    fs, folder = storage.filesystem(str(checkpoint_dir))
    try:
        with fs.open_input_stream(f"{folder}/{PROGRESS}") as stream:
            record = json.loads(stream.read())
    except FileNotFoundError:
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            log.warning("skipping incomplete stage checkpoint %s: no %s", checkpoint_dir, PROGRESS)
        return None
    except (OSError, ValueError) as exc:
        log.warning("skipping stage checkpoint %s: unreadable %s (%s)", checkpoint_dir, PROGRESS, exc)
        return None
    expected = record.get("files", {})  # checkpoints written before the file list: the marker alone
    infos = fs.get_file_info([f"{folder}/{name}" for name in expected])  # one listing call on object stores
    for (name, size), info in zip(expected.items(), infos):
        if info.type != pafs.FileType.File or info.size != size:
            found = "missing" if info.type != pafs.FileType.File else f"{info.size} bytes"
            log.warning("skipping incomplete stage checkpoint %s: %s is %s, expected %d bytes", checkpoint_dir,
                        name, found, size)
            return None
    return record


def read_progress(checkpoint_dir: Path) -> Progress | None:
    record = read_checkpoint_record(checkpoint_dir)
    if record is None:
        return None
    return Progress(record["cycle"], record["stage_index"], record["global_step"])


def check_writable_folder(folder: Path | str) -> str | None:
    """Why `folder` cannot hold checkpoints (cannot be created, not writable, disk full), or None if it can.
    Leaves nothing behind: folders it had to create for the test are removed again."""
    folder = Path(folder).absolute()
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fluxtune-write-test-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"0" * 4096)  # a real block: a full disk fails here, not at the first checkpoint
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in _OUT_OF_SPACE:
            reason += f" ({_mib(shutil.disk_usage(_existing_parent(folder)).free)} free)"
        return reason
    finally:
        for path in created:  # deepest first
            if path.is_dir():
                path.rmdir()
    return None


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)


def _out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _OUT_OF_SPACE
    found = _RUST_OS_ERROR.search(str(exc))
    return found is not None and int(found.group(1)) in _OUT_OF_SPACE


def _layout_bytes(entries: list[tuple[str, tuple[int, ...], Any]]) -> int:
    from fluxtune.flux.weights import nbytes

    return sum(nbytes(shape, dtype) for _, shape, dtype in entries)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
