"""Which rows a run trains and validates on: the bad-rows policy, and an optional explicit validation file.

Import-light (rows checking only): the CLI runs it before Ray starts, and the driver again right before it
builds the latent cache, so files changed in between are caught too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fluxtune.data.images import is_uri, split_is_validation, split_key
from fluxtune.data.rows import DataError, MaskRule, Row, check_rows

ON_BAD_ROWS = ("fail", "skip")


@dataclass
class Selection:
    """Checked rows of the training file (and of `val_jsonl` when given); `skipped` lists dropped rows' problems."""

    jsonl: str
    rows: list[Row]
    val_jsonl: str | None = None
    val_rows: list[Row] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return jsonl_folder(self.jsonl)

    def validation_count(self, val_fraction: float, seed: int) -> int:
        """Validation rows of the run: the explicit file's, or the hash-split share of `rows`."""
        if self.val_rows is not None:
            return len(self.val_rows)
        return sum(split_is_validation(split_key(r.output, self.folder), val_fraction, seed) for r in self.rows)


def jsonl_folder(jsonl: str) -> str:
    """The folder relative row paths resolve against (a URI's parent for s3://… files)."""
    return jsonl.rsplit("/", 1)[0] if is_uri(jsonl) else os.path.dirname(os.path.abspath(jsonl))


def mask_rule(data: dict[str, Any]) -> MaskRule:
    """How a run's `data` settings read masks: threshold, and the crop when the resolution is known."""
    from fluxtune.data.buckets import resolve_buckets
    from fluxtune.data.images import DEFAULT_MASK_THRESHOLD

    resolution = data.get("resolution")
    buckets = resolve_buckets(data.get("buckets"), resolution) if resolution and data.get("buckets") else None
    return MaskRule(threshold=data.get("mask_threshold") or DEFAULT_MASK_THRESHOLD, resolution=resolution,
                    buckets=tuple(tuple(b) for b in buckets) if buckets else None)


def _checked(jsonl: str, on_bad_rows: str, masks: MaskRule) -> tuple[list[Row], list[str]]:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    rows, problems = check_rows(jsonl, masks=masks)
    if problems and (on_bad_rows == "fail" or not rows):
        raise DataError(problems)  # skipping still needs at least one good row
    return rows, problems


def select_rows(jsonl: str, data: dict[str, Any]) -> Selection:
    """Check the data files of a run's `data` config; DataError lists every problem when the policy is "fail"."""
    policy = data.get("on_bad_rows", "fail")
    masks = mask_rule(data)
    rows, skipped = _checked(jsonl, policy, masks)
    selection = Selection(jsonl=jsonl, rows=rows, skipped=skipped)
    if data.get("val_jsonl"):
        selection.val_jsonl = data["val_jsonl"]
        selection.val_rows, val_skipped = _checked(data["val_jsonl"], policy, masks)
        selection.skipped += val_skipped
    return selection
