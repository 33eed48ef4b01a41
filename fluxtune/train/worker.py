"""The function each Ray Train worker runs for a trial: set up once, then every stage of every cycle."""

from __future__ import annotations

import os
from typing import Any

import ray.train
import ray.train.torch
import torch

from fluxtune.assemble import build_shared, encode_arrays, load_bundle
from fluxtune.checkpoints import Progress, read_progress
from fluxtune.cycle import run_cycle
from fluxtune.plugins import use_plugin_set
from fluxtune.registry import registry
from fluxtune.train.datasets import collect
from fluxtune.train.reporter import RayReporter


def _resume(transformer: Any) -> tuple[Progress, Any]:
    """The latest stage checkpoint of this trial's run, if a previous attempt left one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress(), transformer
    from diffusers import FluxTransformer2DModel

    with checkpoint.as_directory() as folder:
        progress = read_progress(folder)
        if progress is None:  # incomplete: never resume from it
            return Progress(), transformer
        resumed = FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"))
    return progress, resumed.to(transformer.device).train()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    use_plugin_set(config["plugins"])  # exactly the driver's plugins, whatever this node's environment says
    experiment = config["experiment"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(experiment["seed"])

    bundle = load_bundle(experiment["model"])
    train_arrays = collect(ray.train.get_dataset_shard("train"))
    val_arrays = collect(ray.train.get_dataset_shard("val"))
    if not train_arrays or not val_arrays:
        raise RuntimeError(f"worker {rank} got no {'training' if not train_arrays else 'validation'} examples")
    train, val = encode_arrays(bundle, train_arrays), encode_arrays(bundle, val_arrays)
    reporter = RayReporter(rank)
    shared = build_shared(experiment, train, val, reporter, registry(), device, rank, world_size)
    progress, transformer = _resume(bundle.transformer.to(device))
    run_cycle(experiment, transformer, shared, progress)
