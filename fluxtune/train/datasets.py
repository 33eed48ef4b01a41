"""Ray Data: read the JSONL, resolve paths, split train/validation deterministically, decode images."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np
import ray.data

from fluxtune.data.images import is_uri, load_examples_batch, split_is_validation, split_key


def _flatten(batch: dict[str, Any], folder: str, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    def resolve(path: str) -> str:
        return path if is_uri(path) or os.path.isabs(path) else os.path.join(folder, path)

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


def build_datasets(jsonl: str, data: dict[str, Any], seed: int) -> dict[str, ray.data.Dataset]:
    """{"train": …, "val": …} datasets of decoded arrays (image, mask, target, prompt)."""
    folder = os.path.dirname(os.path.abspath(jsonl)) if not is_uri(jsonl) else jsonl.rsplit("/", 1)[0]
    decode = partial(load_examples_batch, resolution=data["resolution"])
    rows = ray.data.read_json(jsonl, lines=True).map_batches(
        partial(_flatten, folder=folder, val_fraction=data["val_fraction"], seed=seed), batch_format="numpy")
    if data.get("val_jsonl"):
        train = rows
        val = build_datasets(data["val_jsonl"], {**data, "val_jsonl": None, "val_fraction": 0.0}, seed)["train"]
        return {"train": train.map_batches(decode, batch_format="numpy"), "val": val}
    train = rows.filter(lambda r: not r["is_val"]).map_batches(decode, batch_format="numpy")
    val = rows.filter(lambda r: r["is_val"]).map_batches(decode, batch_format="numpy")
    return {"train": train, "val": val}


def collect(shard: Any) -> dict[str, np.ndarray]:
    """A worker's whole shard as arrays (small: encoded to latents right after)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for key in ("image", "mask", "target", "prompt"):
            parts.setdefault(key, []).append(batch[key])
    if not parts:
        return {}
    return {key: np.concatenate(values) for key, values in parts.items()}
