"""The index of a latent cache: where each row is, which split side and bucket it has, in compact numpy arrays.

The cache build scans the light columns of its Parquet files once (line, split key, flags, prompt index, size;
never the tensors) and writes them, with each row's file, row group and offset, to `index.parquet` beside
`rows/`: a trial worker reads that one small file instead of a column chunk of every row group (one request per
16 rows on S3). So a trial knows its whole plan before reading a single latent. Rows are numbered in
(from_val_file, line) order, whatever order the build wrote them in; units (Parquet row groups) are numbered by
their first row, so the same cache gives the same numbering everywhere.

The split is decided here, exactly as before the cache existed: with a validation file its rows are the
validation set, all of them and only them; else a seeded hash of each row's split key (`split_is_validation`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from fluxtune import storage
from fluxtune.data.cache_format import LIGHT_COLUMNS, PROMPT_GROUP_ROWS, ROW_GROUP_ROWS, write_parquet
from fluxtune.data.images import split_is_validation

INDEX_FILE = "index.parquet"


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


def scan_rows(rows_dir: str) -> Any:
    """The index table of a cache's rows/: per row its file (name inside rows/), row group, offset in the row
    group, and the light columns. Reads every row group's light column chunks: done once, by the cache build."""
    import pyarrow as pa

    tables = []
    for path in parquet_files(rows_dir):
        parquet = open_parquet(path)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        if not sum(sizes):
            continue
        light = parquet.read(columns=list(LIGHT_COLUMNS))
        place = {"file": pa.array([posixpath.basename(path)] * sum(sizes), pa.string()),
                 "group": pa.array(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)),
                 "offset": pa.array(np.concatenate([np.arange(s, dtype=np.int32) for s in sizes]))}
        tables.append(pa.table({**place, **{name: light.column(name) for name in LIGHT_COLUMNS}}))
    return pa.concat_tables(tables)


def write_index(rows_dir: str, path: str) -> None:
    """Scan rows/ and write the index table to `path` (a local path or a URI)."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    with fs.open_output_stream(inner) as stream:
        pq.write_table(scan_rows(rows_dir), stream)


def read_index_table(rows_dir: str, index_path: str | None) -> Any:
    """The index table from `index_path` when the cache has one, else scanned from rows/."""
    import pyarrow.parquet as pq

    if index_path is not None and storage.exists(index_path):
        fs, inner = storage.filesystem(index_path)
        with fs.open_input_file(inner) as file:
            return pq.read_table(file)
    return scan_rows(rows_dir)


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
    def read(cls, rows_dir: str, val_fraction: float, seed: int, explicit_val: bool,
             index_path: str | None = None) -> "CacheIndex":
        import pyarrow as pa

        table = read_index_table(rows_dir, index_path)
        files = table.column("file").combine_chunks()
        files = files if pa.types.is_dictionary(files.type) else files.dictionary_encode()
        names = files.dictionary.to_pylist()
        file_names = sorted(names)  # files numbered by name, not by where the index lists them first
        renumber_files = np.array([file_names.index(name) for name in names], dtype=np.int32)
        columns = {name: table.column(name).to_numpy() for name in ("group", "offset", *LIGHT_COLUMNS)
                   if name != "split_key"}
        columns["file"] = renumber_files[files.indices.to_numpy()]
        if explicit_val:  # a `val_jsonl` was given: its rows are the validation set, all of them and only them
            columns["is_val"] = columns["from_val_file"].astype(bool)
        else:
            columns["is_val"] = np.array([split_is_validation(key, val_fraction, seed)
                                          for key in table.column("split_key").to_pylist()], dtype=bool)
        del table

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
        return cls(files=[storage.join(rows_dir, name) for name in file_names], unit_file=unit_file,
                   unit_group=unit_group, row_unit=row_unit.astype(np.int32), row_offset=columns["offset"], line=columns["line"].astype(np.int64),
                   from_val_file=columns["from_val_file"].astype(bool), is_val=columns["is_val"],
                   prompt_index=columns["prompt_index"].astype(np.int64),
                   bucket=np.array([position[p] for p in pairs], dtype=np.int16), sizes=sizes)

    def training_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    def validation_rows(self, limit: int | None = None) -> np.ndarray:
        """The first `limit` validation rows in (from_val_file, line) order: a fixed, bounded validation set."""
        return np.flatnonzero(self.is_val)[:limit]


def write_cache_folder(folder: str, row_tables: list[Any], prompt_table: Any, manifest: dict[str, Any],
                       row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """A complete cache folder from Arrow tables (`rows_table`, `prompts_table`), one Parquet file per rows table,
    manifest last: what tests and the scale benchmark use to write generated caches without encoding images."""
    import json

    from fluxtune import storage

    for number, table in enumerate(row_tables):
        write_parquet(table, storage.join(folder, "rows", f"part-{number:05d}.parquet"), row_group_rows)
    write_parquet(prompt_table, storage.join(folder, "prompts", "part-00000.parquet"), PROMPT_GROUP_ROWS)
    write_index(storage.join(folder, "rows"), storage.join(folder, INDEX_FILE))
    storage.write_bytes(storage.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode())
