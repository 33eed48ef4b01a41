"""Ray Data for trials: the latent cache built once per sweep, read by every trial from its Parquet files.

The driver calls `prepare_sweep_data` before any trial starts: it checks the rows again (files may have changed
since the CLI's preflight), applies the bad-rows policy and finds or builds the latent cache. Trials receive the
cache folder and `build_datasets` reads it: the train/validation split is decided at read time from each row's
split key, so trials with other seeds or validation fractions share one cache.

`build_datasets` also accepts a JSONL path: then images are decoded in Ray Data and encoded in each worker
("on the fly"), the path the benchmark compares against.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import ray.data

from fluxtune import storage
from fluxtune.data.buckets import resolve_buckets
from fluxtune.data.images import (DEFAULT_MASK_THRESHOLD, is_uri, load_examples_batch, split_is_validation, split_key,
                                  stack_rows)
from fluxtune.data.latent_cache import (LatentCache, Preprocessing, cache_for, cache_rows, ensure_cache, is_cache_folder,
                                        is_cache_set, open_cache, write_cache_set)
from fluxtune.data.sweep_caches import data_variants
from fluxtune.data.selection import jsonl_folder, select_rows


# CPUs each Ray Data read/filter task asks for. Train workers may hold every whole CPU (and a trial that Tune
# stopped can hold its worker group's for a while): tasks that need a whole CPU then wait forever (FACTS: the
# hang). Reading Parquet or decoding a few images is light; a quarter CPU lets it run beside them.
READ_CPUS = 0.25


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
                         buckets=None if buckets is None else tuple(buckets))


def _start_local_ray() -> None:
    from fluxtune.train.cluster import start_ray

    start_ray(None, os.cpu_count() or 1)


def prepare_sweep_data(jsonl: str, base: dict[str, Any], cache_dir: str | os.PathLike | None = None,
                       space: dict[str, Any] | None = None) -> PreparedData:
    """Check rows and find or build the latent cache, once per sweep, in the driver (never per trial).

    The cache lives under `cache_dir`, else `data.cache_dir` (a folder or a URI), else the default home. When
    the search `space` varies preprocessing keys (categorical), one cache per combination, listed in a cache set
    that trials receive as their source (`build_datasets` picks theirs)."""
    selection = select_rows(jsonl, base["data"])
    cache_dir = cache_dir if cache_dir is not None else base["data"].get("cache_dir")
    rows = cache_rows(selection)
    found = [ensure_cache(rows, base["model"], preprocessing_of(data), cache_dir, _start_local_ray)
             for data in data_variants(base["data"], space)]
    caches = [cache for cache, _ in found]
    source = str(caches[0].path) if len(caches) == 1 else write_cache_set(caches, cache_dir)
    return PreparedData(source=source, rows=caches[0].manifest["rows"], skipped_rows=len(selection.skipped),
                        cache_key=",".join(c.key for c in caches), cache_built=any(b for _, b in found),
                        build_s=sum(c.manifest["build_s"] for c in caches), caches=len(caches))


def build_datasets(source: str, data: dict[str, Any], seed: int, model: dict[str, Any] | None = None
                   ) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} datasets (plus "prompts" for a cache): latents from a cache folder (or this trial's cache
    of a cache set), else decoded arrays."""
    if is_cache_set(source):
        return _cached_datasets(open_cache(cache_for(source, preprocessing_of(data).identity())), data, seed, model)
    if is_cache_folder(source):
        return _cached_datasets(open_cache(source), data, seed, model)
    return _decoded_datasets(source, data, seed)


def _check_cache_matches(cache: LatentCache, data: dict[str, Any], model: dict[str, Any] | None) -> None:
    built = cache.manifest["preprocessing"]
    wanted = preprocessing_of(data).identity()
    if built != wanted:
        shown = ", ".join(f"{k} {built.get(k)} (wanted {wanted.get(k)})" for k in ("resolution", "mask_threshold",
                                                                                     "buckets")
                          if built.get(k) != wanted.get(k))
        raise ValueError(
            f"the latent cache {cache.path} was built with {shown}: a sweep builds caches once, before any trial, "
            "for the base and the categorical choices of searched data.resolution, data.mask_threshold and "
            "data.buckets; this trial's data matches none of them")
    spec = cache.manifest["model"]["spec"]
    if model is not None and {k: model.get(k) for k in spec} != spec:
        raise ValueError(f"the latent cache {cache.path} was encoded with model {spec}, this trial uses "
                         f"{ {k: model.get(k) for k in spec} }: do not search over model keys")


def _read_parquet_files(batch: dict[str, np.ndarray]) -> Any:
    import pyarrow
    import pyarrow.parquet

    return pyarrow.concat_tables([pyarrow.parquet.read_table(str(path)) for path in batch["path"]])


def read_parquet_light(folder: str) -> ray.data.Dataset:
    """The Parquet files of a folder as a dataset, read by tasks that ask for a quarter CPU.

    `ray.data.read_parquet` in Ray 2.60 lists files in a task that always asks for one whole CPU
    (`plan_list_files_op.py` passes no num_cpus), so it waits forever while Train workers hold every whole CPU.
    The file list is known here; `from_items` builds its block in this process without a task.
    """
    paths = storage.list_files(folder, ".parquet") if is_uri(folder) else sorted(
        str(p) for p in Path(folder).glob("*.parquet"))
    if not paths:
        raise ValueError(f"{folder} holds no Parquet files")
    return ray.data.from_items([{"path": p} for p in paths]).map_batches(
        _read_parquet_files, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS)


def _is_validation(row: dict[str, Any], val_fraction: float, seed: int, explicit: bool) -> bool:
    if explicit:  # a `val_jsonl` was given: its rows are the validation set, all of them and only them
        return bool(row["from_val_file"])
    return split_is_validation(str(row["split_key"]), val_fraction, seed)


def _cached_datasets(cache: LatentCache, data: dict[str, Any], seed: int,
                     model: dict[str, Any] | None) -> dict[str, ray.data.Dataset]:
    _check_cache_matches(cache, data, model)
    side = partial(_is_validation, val_fraction=data["val_fraction"], seed=seed,
                   explicit=cache.manifest["val_file_rows"] > 0)
    rows = read_parquet_light(cache.rows_dir)
    with warnings.catch_warnings():  # "use expr": an expression cannot compute the split's hash
        warnings.filterwarnings("ignore", message=".*instead of 'fn'", category=UserWarning)
        train = rows.filter(lambda row: not side(row), num_cpus=READ_CPUS)
        val = rows.filter(side, num_cpus=READ_CPUS)
    return {"train": train, "val": val, "prompts": ray.data.from_items(_read_prompt_table(cache.prompts_dir))}


def _read_prompt_table(folder: str) -> list[dict[str, Any]]:
    """The prompt table read here, in one go: one row per distinct prompt, needed whole by every worker. A
    `read_parquet` job per worker costs seconds of task start-up for a few rows, and `from_arrow` runs a
    metadata task that needs a whole free CPU; `from_items` builds its blocks right here."""
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(folder)
    # Chunk by chunk: Ray's tensor extension arrays keep their shape only through their own to_numpy().
    columns = {name: np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in table.column(name).chunks])
               for name in table.column_names}
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def _flatten(batch: dict[str, Any], folder: str, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    def resolve(path: str) -> str:
        if is_uri(path) or os.path.isabs(path):
            return path
        return f"{folder}/{path}" if is_uri(folder) else os.path.join(folder, path)

    user_input = batch["user_input"]
    output = [resolve(str(o)) for o in batch["output"]]
    prompts = batch.get("prompt")
    return {
        "image": np.array([resolve(u["image"]) for u in user_input], dtype=object),
        "mask": np.array([resolve(u["mask"]) for u in user_input], dtype=object),
        "output": np.array(output, dtype=object),
        "prompt": np.array([p if isinstance(p, str) else "" for p in prompts] if prompts is not None
                           else [""] * len(output), dtype=object),
        # Split by the path relative to the JSONL: moving the dataset keeps every example on its side.
        "is_val": np.array([split_is_validation(split_key(o, folder), val_fraction, seed) for o in output]),
    }


def _decoded_datasets(jsonl: str, data: dict[str, Any], seed: int) -> dict[str, ray.data.Dataset]:
    """Rows read from the JSONL itself, images decoded in Ray Data (no cache); workers encode them."""
    if data.get("buckets") is not None:
        raise ValueError("aspect-ratio buckets (data.buckets) need the latent cache: pass a cache folder, "
                         "not the JSONL")
    decode = partial(load_examples_batch, resolution=data["resolution"],
                     mask_threshold=data.get("mask_threshold", DEFAULT_MASK_THRESHOLD))
    light = {"num_cpus": READ_CPUS}
    rows = ray.data.read_json(jsonl, lines=True, **light).map_batches(
        partial(_flatten, folder=jsonl_folder(jsonl), val_fraction=data["val_fraction"], seed=seed),
        batch_format="numpy", **light)
    if data.get("val_jsonl"):
        val = _decoded_datasets(data["val_jsonl"], {**data, "val_jsonl": None, "val_fraction": 0.0}, seed)["train"]
        return {"train": rows.map_batches(decode, batch_format="numpy", **light), "val": val}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*instead of 'fn'", category=UserWarning)
        train = rows.filter(lambda r: not r["is_val"], **light).map_batches(decode, batch_format="numpy", **light)
        val = rows.filter(lambda r: r["is_val"], **light).map_batches(decode, batch_format="numpy", **light)
    return {"train": train, "val": val}


def collect(shard: Any) -> dict[str, np.ndarray]:
    """A worker's whole shard as arrays, every column (latents are small enough to hold; images are encoded
    right after). Cached rows come back in file order, so a trial sees the same tensors in the same order
    whichever order Ray Data read the Parquet files in."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        return {}
    arrays = {key: _concatenate_rows(values) for key, values in parts.items()}
    if "line" in arrays:
        order = np.lexsort((arrays["line"], arrays["from_val_file"]))
        arrays = {key: value[order] for key, value in arrays.items()}
    return arrays


def _concatenate_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Batches of one column as one array. Rows of several sizes (aspect-ratio buckets: Ray Data gives a batch
    either stacked, when its rows share a size, or as an object array) become a 1-D object array of rows."""
    ragged = any(p.dtype == object and len(p) and isinstance(p[0], np.ndarray) for p in parts)
    if not ragged and len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)
    return stack_rows([row for part in parts for row in part])

