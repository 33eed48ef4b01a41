"""The index of a latent cache: where each row is, which split side and bucket it has, in compact numpy arrays.

Built by one pass over the light columns (line, split key, flags, prompt index, size; never the tensors), so
a trial knows its whole plan before reading a single latent. Rows are numbered in (from_val_file, line) order,
whatever order the cache build wrote them in; units (Parquet row groups) are numbered by their first row, so the
same cache gives the same numbering everywhere.

The split is decided here, exactly as before the cache existed: with a validation file its rows are the
validation set, all of them and only them; else a seeded hash of each row's split key (`split_is_validation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fluxtune import storage
from fluxtune.data.cache_format import LIGHT_COLUMNS
from fluxtune.data.images import split_is_validation


def parquet_files(folder: str) -> list[str]:
    """The Parquet files of a cache folder (a local path or a URI), sorted."""
    files = storage.list_files(folder, ".parquet")
    if not files:
        raise ValueError(f"{folder} holds no Parquet files")
    return files


def open_parquet(path: str) -> Any:
    """A ParquetFile reading from a local path or a URI (ranged reads: only the row groups asked for)."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


@dataclass(frozen=True)
class CacheIndex:
    """Per unit: its file and row group; per row (in row-id order): its unit, offset inside it, and so on."""

    files: list[str]
    unit_file: np.ndarray  # int32 [units]
    unit_group: np.ndarray  # int32 [units]
    row_unit: np.ndarray  # int32 [rows]
    row_offset: np.ndarray  # int32 [rows]
    line: np.ndarray  # int64 [rows]
    from_val_file: np.ndarray  # bool [rows]
    is_val: np.ndarray  # bool [rows]
    prompt_index: np.ndarray  # int64 [rows]
    bucket: np.ndarray  # int16 [rows]: position in `sizes`
    sizes: list[tuple[int, int]]  # (height, width) in pixels, in order of first row

    @property
    def rows(self) -> int:
        return len(self.line)

    @property
    def units(self) -> int:
        return len(self.unit_file)

    @classmethod
    def read(cls, rows_dir: str, val_fraction: float, seed: int, explicit_val: bool) -> "CacheIndex":
        files = parquet_files(rows_dir)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in LIGHT_COLUMNS if name != "split_key"}
        parts.update(file=[], group=[], offset=[], is_val=[])
        for number, path in enumerate(files):
            parquet = open_parquet(path)
            table = parquet.read(columns=list(LIGHT_COLUMNS))
            for name in LIGHT_COLUMNS:
                if name != "split_key":
                    parts[name].append(table.column(name).to_numpy())
            if explicit_val:  # a `val_jsonl` was given: its rows are the validation set, all of them and only them
                parts["is_val"].append(parts["from_val_file"][-1].astype(bool))
            else:  # per file, so the split keys (strings) of a million rows are never all held at once
                parts["is_val"].append(np.array([split_is_validation(key, val_fraction, seed)
                                                 for key in table.column("split_key").to_pylist()], dtype=bool))
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            parts["file"].append(np.full(sum(sizes), number, dtype=np.int32))
            parts["group"].append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
            parts["offset"].append(np.concatenate([np.arange(s, dtype=np.int32) for s in sizes]))
        columns = {name: np.concatenate(values) for name, values in parts.items()}

        order = np.lexsort((columns["line"], columns["from_val_file"]))  # row ids: (from_val_file, line)
        columns = {name: values[order] for name, values in columns.items()}
        # Units by (file, group), numbered by their first row id.
        unit_keys = columns["file"].astype(np.int64) << 32 | columns["group"]
        _, first_row, row_unit = np.unique(unit_keys, return_index=True, return_inverse=True)
        renumber = np.empty(len(first_row), dtype=np.int32)
        renumber[np.argsort(first_row, kind="stable")] = np.arange(len(first_row), dtype=np.int32)
        row_unit = renumber[row_unit.reshape(-1)]
        unit_file = np.empty(len(first_row), dtype=np.int32)
        unit_group = np.empty(len(first_row), dtype=np.int32)
        unit_file[row_unit], unit_group[row_unit] = columns["file"], columns["group"]

        pairs = list(zip(columns["height"].tolist(), columns["width"].tolist()))
        sizes = list(dict.fromkeys(pairs))
        position = {size: i for i, size in enumerate(sizes)}
        return cls(files=files, unit_file=unit_file, unit_group=unit_group, row_unit=row_unit.astype(np.int32),
                   row_offset=columns["offset"], line=columns["line"].astype(np.int64),
                   from_val_file=columns["from_val_file"].astype(bool), is_val=columns["is_val"],
                   prompt_index=columns["prompt_index"].astype(np.int64),
                   bucket=np.array([position[p] for p in pairs], dtype=np.int16), sizes=sizes)

    def training_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    def validation_rows(self, limit: int | None = None) -> np.ndarray:
        """The first `limit` validation rows in (from_val_file, line) order: a fixed, bounded validation set."""
        return np.flatnonzero(self.is_val)[:limit]
