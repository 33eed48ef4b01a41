"""One prompt table for the caches a sweep builds from one dataset.

A sweep that searches preprocessing keys (resolution, buckets, mask threshold) builds one latent cache per choice
from the same rows, so every cache would hold the same prompt embeddings: the text encoders (T5-XXL: 9.5 GB) would
load again and every unique prompt be encoded again per cache. The first cache's table is reused instead: hard
links on a local disk (built caches never change, so they can share bytes), server-side copies on object stores.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from fluxtune import storage


def reusable_prompts(source: Any, model_record: dict[str, Any], dtype: str, prompts: list[str]) -> Any:
    """`source` (a LatentCache) when its prompt table is exactly what encoding `prompts` would write: the same text
    encoders (`model_record`, as manifests record them), dtype, and prompts at the same indices (a row refers to its
    prompt by index); else None."""
    if source is None or source.manifest["dtype"] != dtype or source.manifest["model"] != model_record:
        return None
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(source.prompts_dir)
    table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=["prompt_index", "prompt"])
    listed = sorted(zip(table.column("prompt_index").to_pylist(), table.column("prompt").to_pylist()))
    same = [index for index, _ in listed] == list(range(len(prompts))) and [p for _, p in listed] == prompts
    return source if same else None


def link_files(source: str, target: str) -> None:
    """The files of folder `source` under `target`, both in one cache home: hard links on a local disk (copies where
    links are refused), server-side copies between URIs."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(source)
    _, target_inner = storage.filesystem(target)
    if not storage.is_uri(target):  # an object store has no folders to make
        os.makedirs(target_inner, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(inner)):
        destination = f"{target_inner}/{info.base_name}"
        if storage.is_uri(source):
            fs.copy_file(info.path, destination)
            continue
        try:
            os.link(info.path, destination)
        except OSError:
            shutil.copy2(info.path, destination)
