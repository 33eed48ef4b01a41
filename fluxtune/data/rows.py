"""Read a dataset JSONL file and check every row before any training starts.

One row per line: `{"user_input": {"image": "a.png", "mask": "a_mask.png"}, "output": "a_target.png"}`, with an
optional `"prompt"`. Relative paths resolve against the JSONL file's folder. Every problem in the file is
collected and reported at once as `file:line: message`, so a user fixes their data in one pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fluxtune.data.images import is_uri, mask_as_gray

PATH_KEYS = ("user_input.image", "user_input.mask", "output")


@dataclass(frozen=True)
class Row:
    """One checked example; paths are absolute (or URIs, left as written)."""

    line: int
    image: str
    mask: str
    output: str
    prompt: str | None


class DataError(Exception):
    """A dataset with problems; `.problems` lists every one as `file:line: message`."""

    def __init__(self, problems: list[str]):
        if not problems:
            raise ValueError("DataError needs at least one problem")
        self.problems = list(problems)
        super().__init__(self.problems)  # args must rebuild the error: Ray pickles exceptions between processes

    @property
    def summary(self) -> str:
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return self.problems[0] + suffix

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.summary
        return "\n".join([self.summary, *(f"  {problem}" for problem in self.problems)])


def read_rows(jsonl_path: str | os.PathLike, check_files: bool = True) -> list[Row]:
    """All rows of the file, or one DataError listing every problem found."""
    rows, problems = check_rows(jsonl_path, check_files=check_files)
    if problems:
        raise DataError(problems)
    return rows


def check_rows(jsonl_path: str | os.PathLike, check_files: bool = True) -> tuple[list[Row], list[str]]:
    """The good rows and the problems, for callers that skip bad rows instead of failing.

    A skipping caller should still fail when no row survives.
    """
    shown = str(jsonl_path)
    try:
        raw = _read_bytes(shown)
    except FileNotFoundError:
        return [], [f"{shown}: file not found"]
    except IsADirectoryError:
        return [], [f"{shown}: is a directory, expected a .jsonl file"]
    except OSError as error:
        return [], [f"{shown}: cannot read: {error.strerror or error}"]

    folder = shown.rsplit("/", 1)[0] if is_uri(shown) else os.path.dirname(os.path.abspath(jsonl_path))
    rows: list[Row] = []
    problems: list[str] = []
    seen_any = False
    for number, line_bytes in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if not line_bytes.strip():
            continue  # blank lines (a trailing newline, spacing) are not examples
        seen_any = True
        row, row_problems = _check_line(line_bytes, number, folder, check_files)
        problems.extend(f"{shown}:{number}: {message}" for message in row_problems)
        if row is not None and not row_problems:
            rows.append(row)
    if not seen_any:
        problems.append(f"{shown}: contains no examples")
    return rows, problems


def _read_bytes(path: str) -> bytes:
    if is_uri(path) and not path.startswith("file://"):
        from fluxtune.storage import read_bytes  # only for URIs (s3://, gs://, ...), like Ray Data's readers

        return read_bytes(path)
    return Path(path.removeprefix("file://")).read_bytes()


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _check_line(line_bytes: bytes, number: int, folder: str, check_files: bool) -> tuple[Row | None, list[str]]:
    try:
        record = json.loads(line_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except json.JSONDecodeError as error:
        return None, [f"invalid JSON: {error.msg} (column {error.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {_json_type(record)}"]

    problems: list[str] = []
    paths: dict[str, str] = {}
    user_input = record.get("user_input")
    if "user_input" not in record:
        problems.append("missing key 'user_input'")
    elif not isinstance(user_input, dict):
        problems.append(f"'user_input' must be an object, got {_json_type(user_input)}")
    for key in PATH_KEYS:
        parent, _, leaf = key.rpartition(".")
        container = record if not parent else user_input
        if not isinstance(container, dict):
            continue  # already reported above
        if leaf not in container:
            problems.append(f"missing key '{key}'")
        elif not isinstance(container[leaf], str):
            problems.append(f"'{key}' must be a path string, got {_json_type(container[leaf])}")
        elif not container[leaf].strip():
            problems.append(f"'{key}' is an empty path")
        else:
            paths[key] = _resolve(container[leaf], folder)
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(f"'prompt' must be a string, got {_json_type(prompt)}")
        prompt = None
    if problems:
        return None, problems

    if check_files:
        problems.extend(_check_files(paths))
    row = Row(
        line=number,
        image=paths["user_input.image"],
        mask=paths["user_input.mask"],
        output=paths["output"],
        prompt=prompt,
    )
    return row, problems


def _resolve(path: str, folder: str) -> str:
    if is_uri(path):
        return path
    if is_uri(folder):  # a JSONL read from s3://…: its relative paths live beside it, in the same bucket
        return path if path.startswith("/") else f"{folder}/{path}"
    return os.path.normpath(os.path.join(folder, path))  # join keeps absolute paths as given


def _check_files(paths: dict[str, str]) -> list[str]:
    """Existence, full decoding (a truncated file has a fine header) and size agreement; masks must be grey."""
    problems: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    for key, path in paths.items():
        if is_uri(path):
            continue  # remote files are read later by Ray Data / fsspec; checking here would need credentials
        if not os.path.isfile(path):
            problems.append(f"'{key}' file not found: {path}")
            continue
        try:
            with Image.open(path) as image:
                sizes[key] = image.size
                image.load()  # decodes every pixel: what training will do, so it fails here instead
                if key == "user_input.mask":
                    mask_as_gray(image)
        except ValueError as error:
            problems.append(f"'{key}' is not a usable mask: {path}: {error}")
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # SyntaxError: some broken headers
            problems.append(f"'{key}' is not a readable image: {path}: {error}")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{key.rpartition('.')[2]} {w}x{h}" for key, (w, h) in sizes.items())
        problems.append(f"sizes disagree: {listed}")
    return problems
