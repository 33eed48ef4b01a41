"""Latent caches built for real, once per run, for test_cache and test_buckets (the `built_caches` fixture; its
tests run on one pytest-xdist worker, see conftest).

Each build starts encoder processes that import torch, diffusers and transformers and load the tiny model: the
costly part of a cache test. So one mixed-aspect dataset is encoded twice, the way a sweep prepares its data
(`prepare_sweep_data`, which starts Ray when there is something to encode): first its base preprocessing
(centre-square 64 px), then a sweep searching `data.buckets` over [None, auto], which reuses that cache and
builds the bucketed one, its prompt table linked from the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fluxtune.data.sample import make_example

TINY = {"preset": "tiny-fill", "seed": 0}
RESOLUTION = 64
ROWS = 24
SEARCHED_BUCKETS = [None, "auto"]


@dataclass(frozen=True)
class BuiltCaches:
    jsonl: Path
    home: Path  # the cache home both caches live in
    base: dict  # the sweep's base experiment (model and data)
    square: object  # PreparedData of the base alone: the centre-square cache, built then
    searched: object  # PreparedData of the sweep searching data.buckets: a cache set of square and bucketed
    space: dict

    def cache(self, buckets: str | None):
        """The cache a trial of the searched sweep with this `data.buckets` reads."""
        from fluxtune.train.datasets import trial_cache

        return trial_cache(self.searched.source, {**self.base["data"], "buckets": buckets}, TINY)


def write_mixed_dataset(folder: Path, n: int) -> Path:
    """Rows cycling landscape 96x64, portrait 64x96 and square 64x64: sample examples cut from 96² scenes; every
    fourth row has a prompt."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    crops = [(slice(16, 80), slice(None)), (slice(None), slice(16, 80)), (slice(16, 80), slice(16, 80))]
    lines = []
    for i in range(n):
        rows, cols = crops[i % 3]
        source, mask, target, colour = make_example(i, 96, seed=3)
        for suffix, pixels in (("", source), ("_mask", mask), ("_target", target)):
            Image.fromarray(np.ascontiguousarray(pixels[rows, cols])).save(folder / f"images/{i:03d}{suffix}.png")
        line = {"user_input": {"image": f"images/{i:03d}.png", "mask": f"images/{i:03d}_mask.png"},
                "output": f"images/{i:03d}_target.png"}
        if i % 4 == 0:
            line["prompt"] = f"a {colour} square"
        lines.append(json.dumps(line))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def build_caches(folder: Path) -> BuiltCaches:
    import ray

    from fluxtune.config.schema import CategoricalDist
    from fluxtune.train.datasets import prepare_sweep_data

    jsonl = write_mixed_dataset(folder / "mixed", ROWS)
    home = folder / "home"
    base = {"data": {"resolution": RESOLUTION, "mask_threshold": 0.5, "val_jsonl": None}, "model": TINY}
    space = {"data.buckets": CategoricalDist(type="categorical", choices=SEARCHED_BUCKETS)}
    try:
        square = prepare_sweep_data(str(jsonl), base, cache_dir=home)
        searched = prepare_sweep_data(str(jsonl), base, cache_dir=home, space=space)
    finally:
        ray.shutdown()
    return BuiltCaches(jsonl=jsonl, home=home, base=base, square=square, searched=searched, space=space)


def read_all(cache) -> dict:
    """Every row of a cache in line order: the columns and prompt table `encoded_from_columns` takes."""
    from fluxtune.data.cache_index import CacheIndex
    from fluxtune.data.prompt_table import PromptTable
    from fluxtune.data.stream import read_examples

    index = CacheIndex.read(cache.rows_dir, 0.0, 0, explicit_val=False)
    return read_examples(index, PromptTable(cache.prompts_dir, 16), np.arange(index.rows))
