"""Files on a local disk or behind a URI (s3://, gs://, hdfs://, memory://, …), reached the way Ray reaches them.

Ray Tune and Ray Train write checkpoints, and Ray Data reads data, through pyarrow's filesystems; fluxtune's own
files beside them (the stage-reuse index, latent caches, data rows) go through the same ones, so a trial on any
node of a cluster finds them. S3 takes its endpoint and credentials from the usual AWS_* variables (including
AWS_ENDPOINT_URL) or from `?endpoint_override=…&scheme=http` in the URI; a scheme pyarrow lacks goes through
fsspec. pyarrow is imported lazily: plain local work needs neither it nor fsspec.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(path: str) -> bool:
    """True for `s3://…`, `gs://…`, `file://…` and the like."""
    return bool(_URI.match(str(path)))


def join(root: str, *parts: str) -> str:
    """`root/part/…`; a URI keeps its scheme and any `?query` (an endpoint override) at the end."""
    if not is_uri(root):
        return os.path.join(root, *parts)
    base, question, query = str(root).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + question + query


def qualify(path: str, root: str) -> str:
    """Ray reports a checkpoint's path inside its filesystem (`bucket/key` for s3): give it `root`'s scheme back."""
    if is_uri(root) and not is_uri(path):
        return f"{str(root).split('://', 1)[0]}://{path}"
    return str(path)


def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).resolve())
    try:
        return pafs.FileSystem.from_uri(str(path))
    except pyarrow.ArrowInvalid:  # a scheme pyarrow does not know natively (memory://, …): fsspec's
        try:
            import fsspec
        except ImportError as error:
            raise ImportError(f"reading {path} needs fsspec and its filesystem for this scheme") from error
        fs, inner = fsspec.core.url_to_fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def write_bytes(path: str, data: bytes) -> None:
    """Readers never see half a file: a local file is renamed into place; an object-store PUT is atomic."""
    fs, inner = filesystem(path)
    if is_uri(path):
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
        return
    Path(inner).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{inner}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        Path(tmp).write_bytes(data)
        os.replace(tmp, inner)
    except BaseException:  # a full disk: no half-written temporary file is left behind
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON document at `path`, or None when there is none."""
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        return None


def write_json(path: str, document: dict[str, Any]) -> None:
    write_bytes(path, json.dumps(document, indent=1, default=str).encode())


def remove(path: str) -> None:
    fs, inner = filesystem(path)
    fs.delete_file(inner)


def change_token(path: str) -> str:
    """What identifies this version of a remote object without downloading it: size and modification time
    (S3 sets a new LastModified on every upload). FileNotFoundError when it is missing."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return f"size={info.size} mtime_ns={info.mtime_ns}"


def _listing(path: str, kind: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except FileNotFoundError:
        return []
    wanted = pafs.FileType.Directory if kind == "folders" else pafs.FileType.File
    return sorted(posixpath.basename(i.path) for i in infos if i.type == wanted)


def list_files(path: str, suffix: str = "") -> list[str]:
    """Full paths of the files directly under `path` whose names end with `suffix`, sorted."""
    return [join(path, name) for name in _listing(path, "files") if name.endswith(suffix)]


def list_folders(path: str, prefix: str = "") -> list[str]:
    """Full paths of the folders directly under `path` whose names start with `prefix`, sorted."""
    return [join(path, name) for name in _listing(path, "folders") if name.startswith(prefix)]


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


__all__ = ["change_token", "check_writable", "exists", "filesystem", "is_uri", "join", "list_files", "list_folders",
           "local_copy", "qualify", "read_bytes", "read_json", "remove", "write_bytes", "write_json"]
