"""Latent caches written directly (no images, no VAE, no Ray): rows whose tensors say which row they are.

Every value of a row's x0 is its line number and every value of its cond is -line, so a test reads back from a
batch exactly which rows it holds. Rows are written in a shuffled order over two files, as a parallel cache build
may write them (`files` files).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fluxtune.data.cache_format import DTYPES, prompts_table, rows_table
from fluxtune.data.cache_index import write_cache_folder
from fluxtune.data.latent_cache import CACHE_FORMAT, Preprocessing

TEXT_LENGTH, TEXT_WIDTH, POOLED = 3, 32, 32  # the tiny model's joint and pooled widths: it can train on them


def prompt_value(index: int) -> float:
    return 100.0 + index


def write_generated_cache(folder: str, rows: int, sizes: Sequence[tuple[int, int]] = ((32, 32),),
                          dtype: str = "float32", prompts: int = 3, val_file_rows: int = 0,
                          row_group_rows: int = 16, resolution: int = 32, files: int = 2) -> str:
    """A cache of `rows` rows, lines 1..rows, cycling through `sizes` ((height, width) pixels, 8x VAE) and
    prompts; the last `val_file_rows` rows come from a validation file."""
    assert dtype in DTYPES
    order = np.random.default_rng(0).permutation(rows)
    lines = order + 1
    heights = [sizes[i % len(sizes)][0] for i in order]
    widths = [sizes[i % len(sizes)][1] for i in order]
    seq = [(h // 16) * (w // 16) for h, w in zip(heights, widths)]
    batch = {
        "line": lines, "split_key": np.array([f"images/{line:05d}_target.png" for line in lines], dtype=object),
        "from_val_file": lines > rows - val_file_rows, "prompt_index": lines % prompts,
        "height": np.array(heights), "width": np.array(widths),
        "x0": [np.full((s, 64), line, np.float32) for s, line in zip(seq, lines)],
        "cond": [np.full((s, 320), -line, np.float32) for s, line in zip(seq, lines)],
    }
    bounds = np.linspace(0, rows, files + 1).astype(int)
    tables = [rows_table({k: v[start:end] for k, v in batch.items()}, dtype, resolution)
              for start, end in zip(bounds[:-1], bounds[1:])]
    table = prompts_table({"prompt_index": np.arange(prompts), "prompt": ["", *[f"p{i}" for i in range(1, prompts)]],
                           "prompt_embeds": [np.full((TEXT_LENGTH, TEXT_WIDTH), prompt_value(i), np.float32)
                                             for i in range(prompts)],
                           "pooled": [np.full(POOLED, prompt_value(i), np.float32) for i in range(prompts)]}, dtype)
    buckets = None if len(sizes) == 1 else tuple((w, h) for h, w in sizes)
    preprocessing = Preprocessing(resolution, buckets=buckets, dtype=dtype)
    manifest = {"format": CACHE_FORMAT, "key": "generated", "rows": rows, "val_file_rows": val_file_rows,
                "prompts": prompts, "model": {"spec": {"preset": "tiny-fill", "path": None, "seed": 0}},
                "preprocessing": preprocessing.identity(), "vae_scale_factor": 8, "dtype": dtype}
    write_cache_folder(folder, tables, table, manifest, row_group_rows)
    return folder


def lines_of(batch) -> list[int]:
    """The line numbers of a batch's rows (see the module docstring)."""
    return [int(v) for v in batch["x0"][:, 0, 0].tolist()]
