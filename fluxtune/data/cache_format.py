"""How tensors sit in the latent cache's Parquet files, written and read with plain pyarrow.

Each tensor is one `binary` value per row: its raw bytes, row-major, in the cache's dtype. The column's field
metadata says how to read them back: `dtype` and `shape`, with -1 for the leading size that varies from row to
row (image tokens with aspect-ratio buckets), e.g. x0 `[-1, 64]`, cond `[-1, 320]`, prompt_embeds `[-1, 4096]`,
pooled `[768]`. Raw bytes decode as fast as memory copies (nested Arrow lists cost a Parquet level per value:
several times slower to read). Tensors are stored in float16 by default (half the bytes; see BENCHMARKS.md for
what it costs in validation loss) and upcast by the reader.

Row groups are small (ROW_GROUP_ROWS rows): a row group is the unit a training stream reads, shuffles and
shards, so a small one keeps the rows a worker holds small. Only numpy and pyarrow: Ray Data tasks, trials and
tests use it alike.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

ROW_GROUP_ROWS = 16  # rows per Parquet row group (a stream unit): ≈50 MB of float16 latents at 1024²
PROMPT_GROUP_ROWS = 4  # prompt embeddings per row group: each is 4 MiB at FLUX.1 size (512 × 4096 float16)
FILE_BYTES = 128 << 20  # a cache build starts a new Parquet file after about this many bytes
DTYPES = ("float16", "float32")
ROW_TENSORS = ("x0", "cond")
PROMPT_TENSORS = ("prompt_embeds", "pooled")
# What the index pass reads: everything but the tensors.
LIGHT_COLUMNS = ("line", "split_key", "from_val_file", "prompt_index", "height", "width")
PROMPT_LIGHT_COLUMNS = ("prompt_index", "prompt")


def parquet_options(light: Sequence[str], tensors: Sequence[str]) -> dict[str, Any]:
    """Parquet writer options: tensor columns uncompressed, without dictionary or statistics (float bytes do
    not compress, and reading them back is then a plain copy: ≈4x less CPU per row group than snappy)."""
    return {"compression": {**{name: "snappy" for name in light}, **{name: "none" for name in tensors}},
            "use_dictionary": list(light), "write_statistics": list(light)}


ROWS_OPTIONS = parquet_options(LIGHT_COLUMNS, ROW_TENSORS)
PROMPTS_OPTIONS = parquet_options(PROMPT_LIGHT_COLUMNS, PROMPT_TENSORS)


def _tensor_column(name: str, rows: Sequence[np.ndarray], dtype: str, what: str) -> tuple[Any, Any]:
    """(field, array): per-row arrays of one trailing shape as raw `dtype` bytes, checked finite in `dtype`."""
    import pyarrow as pa

    rows = [np.ascontiguousarray(np.asarray(r, dtype=np.float32).astype(dtype)) for r in rows]
    if not all(np.isfinite(r).all() for r in rows):  # a float16 overflow (|x| > 65504) or a broken encoder
        raise ValueError(f"{what} has values that are not finite in {dtype}")
    shapes = {r.shape for r in rows}
    tails = {shape[1:] for shape in shapes}
    if len(tails) != 1:
        raise ValueError(f"{what}: rows of {name} differ beyond their first dimension: {sorted(shapes)}")
    shape = list(shapes.pop()) if len(shapes) == 1 and rows[0].ndim == 1 else [-1, *tails.pop()]
    field = pa.field(name, pa.binary(), metadata={"dtype": dtype, "shape": json.dumps(shape)})
    return field, pa.array([r.tobytes() for r in rows], type=pa.binary())


def _table(columns: dict[str, Any], tensors: dict[str, tuple[Any, Any]]) -> Any:
    import pyarrow as pa

    fields = [pa.field(name, array.type) for name, array in columns.items()] + [f for f, _ in tensors.values()]
    return pa.Table.from_arrays([*columns.values(), *(a for _, a in tensors.values())], schema=pa.schema(fields))


def rows_table(batch: Mapping[str, Any], dtype: str, resolution: int) -> Any:
    """An encoded batch (LatentEncoder's output: stacked or per-row x0/cond, line, split_key, …) as the Arrow
    table the cache stores. Rows without bucket columns get height = width = resolution."""
    import pyarrow as pa

    count = len(batch["line"])
    columns: dict[str, Any] = {
        "line": pa.array(np.asarray(batch["line"], dtype=np.int64)),
        "split_key": pa.array([str(k) for k in batch["split_key"]], type=pa.string()),
        "from_val_file": pa.array(np.asarray(batch["from_val_file"], dtype=bool)),
        "prompt_index": pa.array(np.asarray(batch["prompt_index"], dtype=np.int64)),
    }
    for side in ("height", "width"):
        values = batch[side] if side in batch else np.full(count, resolution)
        columns[side] = pa.array(np.asarray(values, dtype=np.int64))
    lines = list(np.asarray(batch["line"]).tolist())
    return _table(columns, {name: _tensor_column(name, list(batch[name]), dtype, f"{name} of lines {lines}")
                            for name in ROW_TENSORS})


def prompts_table(batch: Mapping[str, Any], dtype: str) -> Any:
    """PromptEncoder's output (prompt_index, prompt, prompt_embeds, pooled) as the cache's prompt table."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "prompt_index": pa.array(np.asarray(batch["prompt_index"], dtype=np.int64)),
        "prompt": pa.array([str(p) for p in batch["prompt"]], type=pa.string()),
    }
    indices = list(np.asarray(batch["prompt_index"]).tolist())
    return _table(columns, {name: _tensor_column(name, list(batch[name]), dtype, f"{name} of prompts {indices}")
                            for name in PROMPT_TENSORS})


def tensor_rows(table: Any, name: str, positions: Sequence[int] | None = None) -> list[np.ndarray]:
    """Column `name` of a table read from the cache as per-row numpy arrays in the stored dtype: the rows at
    `positions` (default all), in that order.

    Rows are copies, not views of the read buffer: a row kept in a shuffle buffer must not keep the rest of its
    row group alive."""
    import pyarrow as pa

    metadata = table.schema.field(name).metadata or {}
    if b"dtype" not in metadata:
        raise ValueError(f"column {name} is not a tensor column of a fluxtune latent cache (no dtype metadata)")
    dtype, shape = np.dtype(metadata[b"dtype"].decode()), json.loads(metadata[b"shape"])
    column = table.column(name).combine_chunks()
    _, offsets, data = column.buffers()
    wide = column.type.equals(pa.large_binary())  # what Ray Data writes when a write's column passes 2 GiB
    offsets = np.frombuffer(offsets, np.int64 if wide else np.int32)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    chosen = range(len(column)) if positions is None else positions
    return [data[offsets[i]:offsets[i + 1]].view(dtype).reshape(shape).copy() for i in chosen]


def write_parquet(table: Any, path: str, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """One Parquet file with small row groups, locally or behind a URI (tests and the scale benchmark write
    generated caches this way; a cache build writes through Ray Data with the same row groups)."""
    import pyarrow.parquet as pq

    from fluxtune import storage

    fs, inner = storage.filesystem(path)
    if not storage.is_uri(path):
        import os

        os.makedirs(os.path.dirname(inner), exist_ok=True)
    with fs.open_output_stream(inner) as stream:
        options = PROMPTS_OPTIONS if "prompt_embeds" in table.column_names else ROWS_OPTIONS
        pq.write_table(table, stream, row_group_size=row_group_rows, **options)
