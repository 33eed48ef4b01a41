"""Ray-free assembly of what a worker trains with: the model bundle, encoded data, losses, the Shared state.

`build_shared` takes the training data as a TrainingStream (trials: `fluxtune.train.datasets.trial_data`) or an
in-memory EncodedSet/BucketedSet (tests, benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fluxtune.context import Reporter, Shared
from fluxtune.flux.encoded import EncodedSet, ValidationSet, encode_examples
from fluxtune.flux.model import FluxBundle, build_tiny_fill, load_flux
from fluxtune.tracking.registered import registered_transformer

VAL_NOISE_SEED_OFFSET = 7_919  # validation noise never shares a stream with training noise


def load_bundle(model: dict[str, Any]) -> FluxBundle:
    bundle = build_tiny_fill(seed=model.get("seed", 0)) if model.get("preset") == "tiny-fill" else load_flux(model["path"])
    if model.get("adapter"):  # start from a registered version (downloaded by the driver)
        bundle.transformer = registered_transformer(model["adapter"], bundle.transformer)
    return bundle


def load_transformer(model: dict[str, Any]) -> Any:
    """Only the transformer: with a latent cache a worker needs neither the VAE nor the text encoders."""
    if model.get("adapter"):  # start from a registered version (downloaded by the driver)
        return load_bundle(model).transformer
    if model.get("preset") == "tiny-fill":
        return build_tiny_fill(seed=model.get("seed", 0)).transformer
    from fluxtune.flux.model import FluxTransformer2DModel, check_fill_layout

    transformer = FluxTransformer2DModel.from_pretrained(model["path"], subfolder="transformer", local_files_only=True)
    check_fill_layout(transformer.config, where=f"{model['path']}/transformer")
    return transformer


def encode_arrays(bundle: FluxBundle, arrays: dict[str, np.ndarray]) -> EncodedSet:
    prompts = [p if isinstance(p, str) else None for p in arrays.get("prompt", [None] * len(arrays["image"]))]
    return encode_examples(bundle, arrays["image"], arrays["mask"], arrays["target"], prompts)


def build_shared(experiment: dict[str, Any], train: Any, val: EncodedSet, reporter: Reporter,
                 registry: Any, device: torch.device, rank: int = 0, world_size: int = 1) -> Shared:
    loss = experiment["loss"]
    timesteps = experiment["timesteps"]
    return Shared(
        train=train.to(device),
        val=ValidationSet.build(val.to(device), seed=experiment["seed"] + VAL_NOISE_SEED_OFFSET),
        batch_size=experiment["data"]["batch_size"],
        guidance=experiment["model"]["guidance"],
        loss_fn=registry.get("loss", loss["type"]).build(loss),
        timesteps=registry.get("timestep_sampler", timesteps["type"]).build(timesteps),
        reporter=reporter,
        registry=registry,
        device=device,
        rank=rank,
        world_size=world_size,
        eval_every=experiment["eval_every"],
        sample_every=experiment.get("sample_every", 1),
        seed=experiment["seed"],
    )
