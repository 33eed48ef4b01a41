"""Everything checked before Ray starts: the spec, the data file and its rows, the validation split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fluxtune.config.errors import InputError, Problem
from fluxtune.config.load import load_search_file
from fluxtune.config.schema import SearchFile
from fluxtune.config.yaml_source import load_yaml


@dataclass
class Checked:
    spec: SearchFile
    base: dict[str, Any]
    jsonl: str
    rows: int
    skipped: list[str] = field(default_factory=list)  # problems of the rows `on_bad_rows: skip` dropped


def _data_problem(spec_path: str, key: str, message: str) -> InputError:
    line, col = load_yaml(spec_path).position(tuple(key.split(".")))
    return InputError([Problem(file=spec_path, message=message, key=key, line=line, col=col)])


def resolve_jsonl(spec_path: str, data: dict[str, Any], seed: int) -> str:
    if data["jsonl"] == "sample":
        from fluxtune.data.sample import ensure_sample_dataset

        return str(ensure_sample_dataset(n=data["sample_size"], resolution=max(data["resolution"], 32), seed=seed))
    path = data["jsonl"]
    from fluxtune.data.images import is_uri

    if not is_uri(path) and not os.path.exists(path):
        raise _data_problem(spec_path, "base.data.jsonl", f"data file {path!r} does not exist")
    return path if is_uri(path) else os.path.abspath(path)


def preflight(spec_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Checked:
    """Spec, data files and every row, checked before Ray starts; bad rows fail here unless skipped."""
    from fluxtune.data.selection import select_rows

    spec, base = load_search_file(spec_path, overrides=overrides)
    data = base["data"]
    jsonl = resolve_jsonl(spec_path, data, base["seed"])
    selection = select_rows(jsonl, data)
    n_val = selection.validation_count(data["val_fraction"], base["seed"])
    if not data["val_jsonl"] and (n_val == 0 or n_val == len(selection.rows)):
        rows = len(selection.rows)
        raise _data_problem(spec_path, "base.data.val_fraction",
                            f"val_fraction {data['val_fraction']} splits {rows} rows into {rows - n_val} "
                            f"training and {n_val} validation rows; both need at least one")
    return Checked(spec=spec, base=base, jsonl=jsonl, rows=len(selection.rows), skipped=selection.skipped)
