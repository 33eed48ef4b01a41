"""Everything checked before Ray starts: the spec, the data file and its rows, the validation split."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def preflight(spec_path: str) -> Checked:
    from fluxtune.data.images import split_is_validation, split_key
    from fluxtune.data.rows import read_rows

    spec, base = load_search_file(spec_path)
    jsonl = resolve_jsonl(spec_path, base["data"], base["seed"])
    rows = read_rows(jsonl)
    data = base["data"]
    if not data["val_jsonl"]:
        folder = os.path.dirname(jsonl)
        keys = [split_key(r.output, folder) for r in rows]
        n_val = sum(split_is_validation(k, data["val_fraction"], base["seed"]) for k in keys)
        if n_val == 0 or n_val == len(rows):
            raise _data_problem(spec_path, "base.data.val_fraction",
                                f"val_fraction {data['val_fraction']} splits {len(rows)} rows into {len(rows) - n_val} "
                                f"training and {n_val} validation rows; both need at least one")
    return Checked(spec=spec, base=base, jsonl=jsonl, rows=len(rows))
