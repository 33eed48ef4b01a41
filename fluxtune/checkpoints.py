"""Stage checkpoints: the transformer's canonical fp32 weights (safetensors) + what the stage exported + progress.

Written atomically: everything goes into `<name>.tmp-<random>`, `progress.json` (the checkpoint's manifest, its
completion marker) last, and the folder is then renamed to its final name. The manifest lists every file with
its size and sha256, taken by the writer, so a reader rejects a folder that someone else copied half-way (Ray Train copies a reported checkpoint
file by file into storage, in no particular order): `read_checkpoint_manifest` is the one check every reader uses.
What is about to be used (resumed, reused, registered) is also hashed again: `usable_checkpoint`, one warning
naming the file that differs. A sweep prunes the transformer weights nobody needs any more (`prune_weights`):
the manifest lists them as pruned, and readers treat a pruned checkpoint's weights as absent without a warning.
"""

from __future__ import annotations

import errno
import hashlib
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
HASH = "sha256"
WEIGHTS = "transformer"  # the part of a checkpoint that is GBs; exports (adapters) are MBs
_CHUNK = 8 << 20
_OUT_OF_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_ANY_ERRNO = re.compile(r"(?:\(os error |\[errno )(\d+)", re.IGNORECASE)
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

    def __init__(self, folder: Path | str, needed: int, free: int, cause: str = ""):
        self.folder, self.needed, self.free = folder, needed, free
        why = f" ({cause})" if cause else ""
        self.cause = cause
        super().__init__(errno.ENOSPC, f"no space to write stage checkpoint {folder}{why}: it needs about "
                                       f"{_mib(needed)}, {_mib(free)} free there; earlier checkpoints are untouched")

    def __reduce__(self):  # Ray pickles a worker's error for the driver
        return type(self), (self.folder, self.needed, self.free, self.cause)


class CheckpointReadOnlyError(OSError):
    """The checkpoint store refuses writes (read-only filesystem, no permission); nothing half-written is left."""

    def __init__(self, folder: Path | str, cause: str):
        self.folder = folder
        self.cause = cause
        super().__init__(errno.EROFS, f"cannot write stage checkpoint {folder} ({cause}): the store is read-only; "
                                      "earlier checkpoints are untouched")

    def __reduce__(self):
        return type(self), (self.folder, self.cause)


def check_room(destination: str | None, needed: int) -> None:
    """Refuse up front (CheckpointSpaceError) when the local folder `destination` cannot take `needed` bytes
    more, so that a copy into it never starts only to be cut short. URIs (object stores) are not checked."""
    if destination is None or storage.is_uri(destination):
        return
    free = shutil.disk_usage(_existing_parent(Path(destination))).free
    if needed > free:
        raise CheckpointSpaceError(destination, needed, free)


def store_error(exc: BaseException, destination: str, needed: int) -> OSError | None:
    """The error to report when writing a checkpoint into `destination` failed with `exc`: the clear
    out-of-space or read-only one, or None for anything else."""
    if isinstance(exc, (CheckpointSpaceError, CheckpointReadOnlyError)):
        return exc
    if _out_of_space(exc):
        free = 0 if storage.is_uri(destination) else shutil.disk_usage(_existing_parent(Path(destination))).free
        return CheckpointSpaceError(destination, needed, free, _first_line(exc))
    if _read_only(exc):
        return CheckpointReadOnlyError(destination, _first_line(exc))
    return None


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
    needed = state_bytes(transformer) + (folder_bytes(export_dir) if has_exports else 0)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if needed > free:  # refuse up front rather than fill the disk for other writers
        raise CheckpointSpaceError(out_dir, needed, free)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        written: dict[str, str] = {}  # the weight files' sha256, hashed as their bytes were written
        save_weights_folder(tmp / "transformer", transformer,
                            weights if weights is not None else LiveWeights(transformer).tensors(), written)
        if has_exports:
            shutil.copytree(export_dir, tmp / "exports")
        files = _describe_files(tmp, {f"transformer/{name}": digest for name, digest in written.items()})
        manifest = {**asdict(progress), "finished_stage": stage, "metrics": metrics, "files": files}
        _write_atomically(tmp / PROGRESS, json.dumps(manifest, indent=1))
        os.replace(tmp, out_dir)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(exc):
            raise CheckpointSpaceError(out_dir, needed, shutil.disk_usage(out_dir.parent).free, str(exc)) from exc
        raise
    return out_dir


def read_checkpoint_manifest(checkpoint_dir: Path | str) -> dict[str, Any] | None:
    """The completion manifest of a finished checkpoint folder (a local path or a storage URI); None, with a
    warning, for anything incomplete: no marker, an unreadable one, a listed file missing or of another size.
    Pruned files are not looked for (`manifest["pruned"]` lists them)."""
    import pyarrow.fs as pafs

    fs, folder = storage.filesystem(str(checkpoint_dir))
    try:
        with fs.open_input_stream(f"{folder}/{PROGRESS}") as stream:
            manifest = json.loads(stream.read())
        expected = {name: _size(entry) for name, entry in manifest.get("files", {}).items()
                    if name not in set(manifest.get("pruned", []))}
    except FileNotFoundError:
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            log.warning("skipping incomplete stage checkpoint %s: no %s", checkpoint_dir, PROGRESS)
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("skipping stage checkpoint %s: unreadable %s (%s)", checkpoint_dir, PROGRESS, exc)
        return None
    infos = fs.get_file_info([f"{folder}/{name}" for name in expected])  # one listing call on object stores
    for (name, size), info in zip(expected.items(), infos):
        if info.type != pafs.FileType.File or info.size != size:
            found = "missing" if info.type != pafs.FileType.File else f"{info.size} bytes"
            log.warning("skipping incomplete stage checkpoint %s: %s is %s, expected %d bytes", checkpoint_dir,
                        name, found, size)
            return None
    return manifest


def weights_pruned(manifest: dict[str, Any]) -> bool:
    return any(name.startswith(WEIGHTS + "/") for name in manifest.get("pruned", []))


def verify_checkpoint(checkpoint_dir: Path | str, manifest: dict[str, Any], parts: tuple[str, ...] = (),
                      problems: list[str] | None = None) -> bool:
    """Hash every listed file (under `parts`, else all) again and compare with the writer's hash. A mismatch
    is one warning naming the file (also appended to `problems`), and False: the checkpoint must not be used.
    Reads every byte once (shards in parallel)."""
    pruned = set(manifest.get("pruned", []))
    expected = {name: entry.get(HASH) for name, entry in manifest.get("files", {}).items()
                if isinstance(entry, dict) and entry.get(HASH)  # older markers: sizes only, already checked
                and name not in pruned and (not parts or name.startswith(tuple(p + "/" for p in parts)))}
    actual = _hashes([storage.join(str(checkpoint_dir), name) for name in expected])
    for (name, want), got in zip(expected.items(), actual):
        if isinstance(got, OSError):
            return _refuse(problems, f"refusing stage checkpoint {checkpoint_dir}: cannot read {name} ({got}); it is "
                                     "not used")
        if got != want:
            return _refuse(problems, f"refusing stage checkpoint {checkpoint_dir}: {name} does not match the {HASH} "
                                     f"in its {PROGRESS} (changed or corrupted since it was written); it is not used")
    return True


def usable_checkpoint(checkpoint_dir: Path | str, parts: tuple[str, ...] = (WEIGHTS,),
                      problems: list[str] | None = None) -> dict[str, Any] | None:
    """The manifest of a checkpoint whose `parts` are complete, not pruned, and hash as written; else None.
    What resume, stage reuse and registration call before they touch a checkpoint."""
    manifest = read_checkpoint_manifest(checkpoint_dir)
    if manifest is None:
        return None
    if WEIGHTS in parts and weights_pruned(manifest):
        log.debug("stage checkpoint %s: weights pruned (not needed by the sweep any more)", checkpoint_dir)
        return None
    return manifest if verify_checkpoint(checkpoint_dir, manifest, parts, problems) else None


def _refuse(problems: list[str] | None, message: str) -> bool:
    log.warning("%s", message)
    if problems is not None:
        problems.append(message)
    return False


def file_hash(path: str) -> str:
    """sha256 of a local file or a storage URI, read in chunks (never whole in memory)."""
    if not storage.is_uri(path):
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, HASH).hexdigest()
    fs, inner = storage.filesystem(path)
    digest = hashlib.new(HASH)
    with fs.open_input_stream(inner) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def prune_weights(checkpoint_dir: Path | str) -> int:
    """Delete a finished checkpoint's transformer weights, keeping its marker (now listing them as pruned) and
    exports. The marker is rewritten first, so a crash in between leaves weights nobody reads, never a marker
    that promises missing weights. Returns the bytes freed (0 when already pruned or not a checkpoint)."""
    folder = str(checkpoint_dir)
    manifest = read_checkpoint_manifest(folder)
    if manifest is None:
        return 0
    weights = sorted(n for n in manifest.get("files", {}) if n.startswith(WEIGHTS + "/"))
    todo = [n for n in weights if n not in set(manifest.get("pruned", []))]
    if not todo:
        return 0
    manifest["pruned"] = sorted(set(manifest.get("pruned", [])) | set(weights))
    storage.write_bytes(storage.join(folder, PROGRESS), json.dumps(manifest, indent=1).encode())
    fs, inner = storage.filesystem(folder)
    try:
        fs.delete_dir(f"{inner}/{WEIGHTS}")
    except FileNotFoundError:  # a crash after the marker was rewritten: nothing left to delete
        return 0
    return sum(_size(manifest["files"][name]) for name in todo)


def read_progress(checkpoint_dir: Path) -> Progress | None:
    manifest = read_checkpoint_manifest(checkpoint_dir)
    if manifest is None:
        return None
    return Progress(manifest["cycle"], manifest["stage_index"], manifest["global_step"])


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


def _describe_files(folder: Path, known: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every file's size and sha256: `known` (relative name → hash) were hashed while being written (the
    transformer's weights: never read back); the rest (config, exported adapters: small) are hashed now."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    names = [str(p.relative_to(folder)) for p in files]
    hashes = dict(zip([n for n in names if n not in known],
                      _hashes([str(folder / n) for n in names if n not in known])))
    for digest in hashes.values():
        if isinstance(digest, OSError):
            raise digest
    return {name: {"size": p.stat().st_size, HASH: known.get(name) or hashes[name]} for p, name in zip(files, names)}


def _hashes(paths: list[str]) -> list[str | OSError]:
    """sha256 of each path, several files at once (hashlib releases the GIL: a sharded 48 GB transformer hashes
    on as many cores as it has shards, up to 8)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> str | OSError:
        try:
            return file_hash(path)
        except OSError as exc:
            return exc

    if len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(one, paths))


def _size(entry: Any) -> int:
    return int(entry["size"]) if isinstance(entry, dict) else int(entry)  # older markers: the size alone


def _out_of_space(exc: BaseException) -> bool:
    return _errno_in(exc, _OUT_OF_SPACE)


def _read_only(exc: BaseException) -> bool:
    return _errno_in(exc, _READ_ONLY)


def _errno_in(exc: BaseException, codes: set[int]) -> bool:
    # pyarrow reports "[Errno 28] Error writing bytes … [errno 28] No space left on device"; safetensors (Rust)
    # "… (os error 28)"
    if isinstance(exc, OSError) and exc.errno in codes:
        return True
    return any(int(code) in codes for code in _ANY_ERRNO.findall(str(exc)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def state_bytes(model: Any) -> int:
    """What a checkpoint of `model` holds: its canonical fp32 weights, whatever dtype it trains in."""
    from fluxtune.canonical import layout
    from fluxtune.flux.weights import nbytes

    return sum(nbytes(shape, dtype) for _, shape, dtype in layout(model))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _existing_parent(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
