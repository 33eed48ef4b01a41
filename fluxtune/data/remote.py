"""Files behind URIs (s3://, gs://, hdfs://, memory://, …), reached the way Ray Data reaches them.

pyarrow's own filesystems first (S3 takes its endpoint and credentials from the usual AWS_* variables, including
AWS_ENDPOINT_URL, or from `?endpoint_override=…&scheme=http` in the URI), else any fsspec filesystem wrapped
for pyarrow. Local paths never come here. Imported lazily: plain local data needs neither pyarrow nor fsspec.
"""

from __future__ import annotations

import posixpath
from typing import Any


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a URI."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid:  # a scheme pyarrow does not know natively (memory://, …): fsspec's
        try:
            import fsspec
        except ImportError as error:
            raise ImportError(f"reading {uri} needs fsspec and its filesystem for this scheme") from error
        fs, path = fsspec.core.url_to_fs(uri)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def change_token(uri: str) -> str:
    """What identifies this version of a remote object without downloading it: size and modification time
    (S3 sets a new LastModified on every upload). FileNotFoundError when it is missing."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(uri)
    return f"size={info.size} mtime_ns={info.mtime_ns}"


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under a folder URI whose names end with `suffix`, sorted."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(join(uri, posixpath.basename(info.path)) for info in infos
                  if info.type == pyarrow.fs.FileType.File and info.path.endswith(suffix))


def join(uri: str, *parts: str) -> str:
    """`uri/part/…` keeping the scheme and any `?query` (an endpoint override) at the end."""
    base, question, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + question + query
