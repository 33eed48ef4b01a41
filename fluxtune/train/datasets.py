"""A trial's data: the latent cache built once per sweep by the driver, streamed by every worker of every trial.

The driver calls `prepare_sweep_data` before any trial starts: it checks the rows again (files may have changed
since the CLI's preflight), applies the bad-rows policy and finds or builds the latent cache (Ray Data). Trials
receive the cache folder (or a cache set) and each worker calls `trial_data`: the train/validation split is
decided at read time from each row's split key, so trials with other seeds or validation fractions share one
cache; training rows are streamed (`fluxtune.data.stream`), the validation set is a bounded set read once.
No Ray here: a worker reads the cache with pyarrow, locally or from a URI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fluxtune.data.buckets import resolve_buckets
from fluxtune.data.images import DEFAULT_MASK_THRESHOLD
from fluxtune.data.latent_cache import (LatentCache, Preprocessing, cache_for, cache_rows, ensure_cache, is_cache_folder,
                                        is_cache_set, open_cache, write_cache_set)
from fluxtune.data.selection import select_rows
from fluxtune.data.sweep_caches import data_variants


@dataclass(frozen=True)
class PreparedData:
    """What the driver hands to trials (`source`) and records in MLflow (the rest)."""

    source: str  # the latent cache folder, or a cache set (one cache per searched preprocessing)
    rows: int
    skipped_rows: int
    cache_key: str  # comma-separated for a cache set
    cache_built: bool  # False: an earlier run or `fluxtune data prepare` built it
    build_s: float
    caches: int = 1

    def summary(self) -> str:
        skipped = f", {self.skipped_rows} bad rows skipped" if self.skipped_rows else ""
        how = f"built in {self.build_s:.1f} s" if self.cache_built else "reused"
        what = "latent cache" if self.caches == 1 else f"{self.caches} latent caches (searched data keys) in"
        return f"{self.rows} rows{skipped}; {what} {self.source} ({how})"

    def mlflow_params(self) -> dict[str, Any]:
        return {"data.rows": self.rows, "data.skipped_rows": self.skipped_rows, "data.cache_key": self.cache_key}


def preprocessing_of(data: dict[str, Any]) -> Preprocessing:
    buckets = resolve_buckets(data.get("buckets"), data["resolution"])
    return Preprocessing(resolution=data["resolution"], mask_threshold=data.get("mask_threshold", DEFAULT_MASK_THRESHOLD),
                         buckets=None if buckets is None else tuple(buckets), dtype=data.get("cache_dtype", "float16"))


def _start_local_ray() -> None:
    from fluxtune.train.cluster import start_ray

    start_ray(None, os.cpu_count() or 1)


def prepare_sweep_data(jsonl: str, base: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                       space: dict[str, Any] | None = None) -> PreparedData:
    """Check rows and find or build the latent cache, once per sweep, in the driver (never per trial).

    The cache lives under `cache_dir`, else `data.cache_dir` (a folder or a URI), else the default home. When
    the search `space` varies preprocessing keys (categorical), one cache per combination, listed in a cache set
    that trials receive as their source (`trial_cache` picks theirs)."""
    selection = select_rows(jsonl, base["data"])
    cache_dir = cache_dir if cache_dir is not None else base["data"].get("cache_dir")
    rows = cache_rows(selection)
    found: list[tuple[LatentCache, bool]] = []
    for data in data_variants(base["data"], space):
        preprocessing = preprocessing_of(data)
        # every variant has the same prompts: encoded once per dtype, linked into the other caches
        prompts_from = next((c for c, _ in found if c.manifest["dtype"] == preprocessing.dtype), None)
        found.append(ensure_cache(rows, base["model"], preprocessing, cache_dir, _start_local_ray, prompts_from))
    caches = [cache for cache, _ in found]
    source = str(caches[0].path) if len(caches) == 1 else write_cache_set(caches, cache_dir)
    return PreparedData(source=source, rows=caches[0].manifest["rows"], skipped_rows=len(selection.skipped),
                        cache_key=",".join(c.key for c in caches), cache_built=any(b for _, b in found),
                        build_s=sum(c.manifest["build_s"] for c in caches), caches=len(caches))


def trial_cache(source: str, data: dict[str, Any], model: dict[str, Any] | None = None) -> LatentCache:
    """The latent cache a trial with this `data` reads: the source folder, or its own cache of a cache set;
    ValueError when it was built for other data or another model."""
    if is_cache_set(source):
        source = cache_for(source, preprocessing_of(data).identity())
    elif not is_cache_folder(source):
        raise ValueError(f"{source} is not a latent cache: trials read the cache the driver prepares "
                         "(fluxtune.train.datasets.prepare_sweep_data)")
    cache = open_cache(source)
    _check_cache_matches(cache, data, model)
    return cache


def _check_cache_matches(cache: LatentCache, data: dict[str, Any], model: dict[str, Any] | None) -> None:
    built = cache.manifest["preprocessing"]
    wanted = preprocessing_of(data).identity()
    if built != wanted:
        shown = ", ".join(f"{k} {built.get(k)} (wanted {wanted.get(k)})"
                          for k in ("resolution", "mask_threshold", "buckets", "dtype") if built.get(k) != wanted.get(k))
        raise ValueError(
            f"the latent cache {cache.path} was built with {shown}: a sweep builds caches once, before any trial, "
            "for the base and the categorical choices of searched data.resolution, data.mask_threshold, "
            "data.buckets and data.cache_dtype; this trial's data matches none of them")
    spec = cache.manifest["model"]["spec"]
    if model is not None and {k: model.get(k) for k in spec} != spec:
        raise ValueError(f"the latent cache {cache.path} was encoded with model {spec}, this trial uses "
                         f"{ {k: model.get(k) for k in spec} }: do not search over model keys")


def trial_data(source: str, experiment: dict[str, Any], rank: int = 0, world_size: int = 1,
               reader: str = "stream") -> tuple[Any, Any]:
    """(training data, validation examples) of one worker: a TrainingStream over this rank's share of the
    training rows, and the first `data.val_max_rows` validation rows as an EncodedSet/BucketedSet (every rank
    holds the same ones). `reader="memory"` loads this rank's training rows whole instead (an EncodedSet):
    only for tests and the benchmark that compares the two."""
    from fluxtune.data.cache_index import CacheIndex
    from fluxtune.data.prompt_table import PromptTable
    from fluxtune.data.stream import TrainingStream, read_examples
    from fluxtune.flux.encoded import encoded_from_columns

    data = experiment["data"]
    cache = trial_cache(source, data, experiment["model"])
    index = CacheIndex.read(cache.rows_dir, data["val_fraction"], experiment["seed"],
                            explicit_val=cache.manifest["val_file_rows"] > 0, index_path=cache.index_path)
    prompts = PromptTable(cache.prompts_dir, data.get("prompt_cache", 128))
    validation = index.validation_rows(data.get("val_max_rows", 64))
    if not len(validation):
        raise ValueError(f"the latent cache {cache.path} has no validation rows for val_fraction "
                         f"{data['val_fraction']} (seed {experiment['seed']}): raise data.val_fraction or give "
                         "data.val_jsonl")
    val = encoded_from_columns(**read_examples(index, prompts, validation), resolution=data["resolution"])
    stream = TrainingStream(index, prompts, cache.manifest["vae_scale_factor"], rank, world_size,
                            shuffle_buffer=data.get("shuffle_buffer", 256))
    if reader == "stream":
        return stream, val
    if reader != "memory":
        raise ValueError(f"unknown reader {reader!r}: stream or memory")
    mine = np.sort(np.concatenate([rows for _, rows in stream.plan(1, 0).epoch(0)]))  # this rank's rows
    return encoded_from_columns(**read_examples(index, prompts, mine), resolution=data["resolution"]), val
