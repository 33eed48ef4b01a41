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

from fluxtune.data.images import (DEFAULT_MASK_THRESHOLD, binary_mask, is_uri, mask_as_gray, oriented_size,
                                  upright)

PATH_KEYS = ("user_input.image", "user_input.mask", "output")


@dataclass(frozen=True)
class MaskRule:
    """How masks are read for training: the grey level that means "inpaint", and, when known, the crop (the
    training resolution and buckets), so a mask whose hole the crop cuts away is a bad row too."""

    threshold: float = DEFAULT_MASK_THRESHOLD
    resolution: int | None = None
    buckets: tuple[tuple[int, int], ...] | None = None


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


def read_rows(jsonl_path: str | os.PathLike, check_files: bool = True, masks: MaskRule = MaskRule()) -> list[Row]:
    """All rows of the file, or one DataError listing every problem found."""
    rows, problems = check_rows(jsonl_path, check_files=check_files, masks=masks)
    if problems:
        raise DataError(problems)
    return rows


def check_rows(jsonl_path: str | os.PathLike, check_files: bool = True,
               masks: MaskRule = MaskRule()) -> tuple[list[Row], list[str]]:
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
        row, row_problems = _check_line(line_bytes, number, folder, check_files, masks)
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


def _check_line(line_bytes: bytes, number: int, folder: str, check_files: bool,
                masks: MaskRule) -> tuple[Row | None, list[str]]:
    try:
        parsed = json.loads(line_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        return None, ["not valid UTF-8"]
    except json.JSONDecodeError as error:
        return None, [f"invalid JSON: {error.msg} (column {error.colno})"]
    if not isinstance(parsed, dict):
        return None, [f"expected a JSON object, got {_json_type(parsed)}"]

    problems: list[str] = []
    paths: dict[str, str] = {}
    user_input = parsed.get("user_input")
    if "user_input" not in parsed:
        problems.append("missing key 'user_input'")
    elif not isinstance(user_input, dict):
        problems.append(f"'user_input' must be an object, got {_json_type(user_input)}")
    for key in PATH_KEYS:
        parent, _, leaf = key.rpartition(".")
        container = parsed if not parent else user_input
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
    prompt = parsed.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(f"'prompt' must be a string, got {_json_type(prompt)}")
        prompt = None
    if problems:
        return None, problems

    if check_files:
        problems.extend(_check_files(paths, masks))
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


def _local(path: str) -> str | None:
    """The local file behind a path or a `file://` URI; None for remote URIs (checked when they are read)."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_uri(path) else path


def _check_files(paths: dict[str, str], masks: MaskRule) -> list[str]:
    """Existence, full decoding (a truncated file has a fine header), size agreement as a viewer shows them
    (EXIF orientation applied), and a mask that is grey and marks something to inpaint."""
    problems: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    mask_image: Image.Image | None = None
    for key, path in paths.items():
        local = _local(path)
        if local is None:
            continue  # remote files are read later by Ray Data / fsspec; checking here would need credentials
        if not os.path.isfile(local):
            problems.append(f"'{key}' file not found: {path}")
            continue
        try:
            with Image.open(local) as image:
                sizes[key] = oriented_size(image)
                image.load()  # decodes every pixel: what training will do, so it fails here instead
                if key == "user_input.mask":
                    mask_image = upright(image)
                    mask_as_gray(mask_image)
                else:
                    image.convert("RGB")  # modes Pillow cannot turn into RGB (e.g. LAB) fail here, not in training
        except ValueError as error:
            what = "is not a usable mask" if key == "user_input.mask" else "is not a usable image"
            problems.append(f"'{key}' {what}: {path}: {error}")
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # SyntaxError: some broken headers
            problems.append(f"'{key}' is not a readable image: {path}: {error}")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{key.rpartition('.')[2]} {w}x{h}" for key, (w, h) in sizes.items())
        problems.append(f"sizes disagree: {listed}")
    elif mask_image is not None and not problems:
        empty = _empty_mask(mask_image, masks, sizes.get("user_input.image") or mask_image.size)
        if empty:
            problems.append(f"'user_input.mask' {empty}: {paths['user_input.mask']}")
    return problems


def _empty_mask(mask: Image.Image, masks: MaskRule, size: tuple[int, int]) -> str | None:
    """Why a mask gives nothing to learn (no pixel to inpaint, or none left after the training crop), or None."""
    if not (mask_as_gray(mask) >= masks.threshold).any():
        return (f"is empty: no pixel at or above mask_threshold {masks.threshold:g}, so there is nothing to inpaint "
                "(white = inpaint)")
    if masks.resolution is None:
        return None
    from fluxtune.data.buckets import nearest_bucket

    bucket = nearest_bucket(size, masks.buckets) if masks.buckets else None
    if not binary_mask(mask, masks.resolution, masks.threshold, bucket).any():
        shown = f"{bucket[0]}x{bucket[1]}" if bucket else f"{masks.resolution}x{masks.resolution}"
        return f"is empty after the training crop to {shown}: its hole lies outside the crop or is too small"
    return None
