"""Where a sweep's trial data lives: a local folder, or a URI (s3://, gs://, …) that every Ray node can reach.

Ray Tune and Ray Train write checkpoints through pyarrow's filesystems; fluxtune's own small records (the
stage-reuse index, which trial reused what) go through the same filesystems, so a trial on any node of a
cluster finds them. Endpoints and credentials come from the usual environment (`AWS_ENDPOINT_URL`, …).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str) -> bool:
    return bool(_URI.match(str(path)))


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return os.path.join(root, *parts)


def qualify(path: str, root: str) -> str:
    """Ray reports a checkpoint's path inside its filesystem (`bucket/key` for s3): give it `root`'s scheme back."""
    if is_uri(root) and not is_uri(path):
        return f"{str(root).split('://', 1)[0]}://{path}"
    return str(path)


def absolute(path: str) -> str:
    """A URI as it is; a local path made absolute (Ray needs absolute local storage paths)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON document at `path`, or None when there is none."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def write_json(path: str, document: dict[str, Any]) -> None:
    """Readers never see half a document: a local file is renamed into place; an object-store PUT is atomic."""
    data = json.dumps(document, indent=1, default=str).encode()
    fs, inner = filesystem(path)
    if is_uri(path):
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
        return
    Path(inner).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{inner}.{uuid.uuid4().hex[:8]}.tmp"
    Path(tmp).write_bytes(data)
    os.replace(tmp, inner)


def list_folders(path: str, prefix: str = "") -> list[str]:
    """Full paths of the folders directly under `path` whose names start with `prefix`."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except FileNotFoundError:
        return []
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))
    return [join(path, name) for name in names]


def remove(path: str) -> None:
    fs, inner = filesystem(path)
    fs.delete_file(inner)


def check_writable(root: str) -> str | None:
    """Why nothing can be written under the URI `root` (no such bucket, no permission, no endpoint), or None.
    Leaves nothing behind."""
    probe = join(root, f".fluxtune-write-test-{uuid.uuid4().hex[:8]}")
    try:
        write_json(probe, {})
        remove(probe)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError subclasses for access, bucket and network errors
        return str(exc).splitlines()[0]
    return None


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local folder with the content of `path`: the folder itself when local, else a temporary download."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="fluxtune-download-") as tmp:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


__all__ = ["absolute", "check_writable", "exists", "filesystem", "is_uri", "join", "list_folders", "local_copy", "qualify",
           "read_json", "remove", "write_json"]
