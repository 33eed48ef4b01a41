"""How tensors sit in the latent cache's Parquet files, written and read with plain pyarrow.

Each tensor column is `list<fixed_size_list<dtype, width>>`: one list per row, each item one token's `width`
channels (x0: 64, cond: 320, prompt_embeds: the text encoder's width), and pooled a plain `list<dtype>`. The
width lives in the type, so a reader needs nothing else; rows of different sizes (aspect-ratio buckets) sit in
one file. Tensors are stored in the cache's dtype (float16 by default: half the bytes, see BENCHMARKS.md for what
it costs in validation loss) and upcast by the reader.

Row groups are small (ROW_GROUP_ROWS rows): a row group is the unit a training stream reads, shuffles and
shards, so a small one keeps the rows a worker holds small. Only numpy and pyarrow: Ray Data tasks, trials and
tests use it alike.
"""

from __future__ import annotations

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


def _tensor_array(rows: Sequence[np.ndarray], dtype: str, what: str) -> Any:
    """Per-row [tokens, width] (or [width]) arrays as one Arrow list column, checked finite in `dtype`."""
    import pyarrow as pa

    arrow_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = np.concatenate([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]).astype(dtype)
    if not np.isfinite(flat).all():  # a float16 overflow (|x| > 65504) or a broken encoder: never cache it
        raise ValueError(f"{what} has values that are not finite in {dtype}")
    values = pa.array(flat, type=arrow_type)
    lengths = [int(np.asarray(r).shape[0]) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    if np.asarray(rows[0]).ndim == 2:  # tokens × width: the width goes into the type
        values = pa.FixedSizeListArray.from_arrays(values, int(np.asarray(rows[0]).shape[1]))
    return pa.ListArray.from_arrays(offsets, values)


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
    for name in ROW_TENSORS:
        columns[name] = _tensor_array(list(batch[name]), dtype, f"{name} of lines {list(batch['line'])}")
    return pa.table(columns)


def prompts_table(batch: Mapping[str, Any], dtype: str) -> Any:
    """PromptEncoder's output (prompt_index, prompt, prompt_embeds, pooled) as the cache's prompt table."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "prompt_index": pa.array(np.asarray(batch["prompt_index"], dtype=np.int64)),
        "prompt": pa.array([str(p) for p in batch["prompt"]], type=pa.string()),
    }
    for name in PROMPT_TENSORS:
        columns[name] = _tensor_array(list(batch[name]), dtype, f"{name} of prompts {list(batch['prompt_index'])}")
    return pa.table(columns)


def tensor_rows(column: Any) -> list[np.ndarray]:
    """An Arrow tensor column (chunked or not) back as per-row numpy arrays in the stored dtype.

    Rows are copies, not views of the read buffer: a row kept in a shuffle buffer must not keep the rest of its
    row group alive."""
    import pyarrow as pa

    chunks = column.chunks if hasattr(column, "chunks") else [column]
    rows: list[np.ndarray] = []
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy()
        items = chunk.values  # the whole child array: `offsets` index into it
        if pa.types.is_fixed_size_list(items.type):  # tokens × width
            flat = items.flatten().to_numpy(zero_copy_only=False).reshape(-1, items.type.list_size)
        else:
            flat = items.to_numpy(zero_copy_only=False)
        rows += [flat[offsets[i]:offsets[i + 1]].copy() for i in range(len(chunk))]
    return rows


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
        pq.write_table(table, stream, row_group_size=row_group_rows)


def write_cache_folder(folder: str, row_tables: list[Any], prompt_table: Any, manifest: dict[str, Any],
                       row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """A complete cache folder from Arrow tables (`rows_table`, `prompts_table`), one Parquet file per rows table,
    manifest last: what tests and the scale benchmark use to write generated caches without encoding images."""
    import json

    from fluxtune import storage

    for number, table in enumerate(row_tables):
        write_parquet(table, storage.join(folder, "rows", f"part-{number:05d}.parquet"), row_group_rows)
    write_parquet(prompt_table, storage.join(folder, "prompts", "part-00000.parquet"), PROMPT_GROUP_ROWS)
    storage.write_bytes(storage.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode())
