"""What a worker trains with, built without Ray: the model bundle (the pyfunc model loads its own with
`load_bundle` too), encoded data, and the `WorkerSetup` every stage of its trial shares.

`build_worker_setup` takes the training data as a TrainingStream (trials: `fluxtune.train.datasets.trial_data`) or an
in-memory EncodedSet/BucketedSet (tests, benchmarks)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from fluxtune.canonical import cast
from fluxtune.context import Reporter, WorkerSetup
from fluxtune.flux.encoded import EncodedSet, ValidationSet, encode_examples
from fluxtune.flux.model import FluxBundle, build_preset, load_flux
from fluxtune.version_contents import registered_transformer

VAL_NOISE_SEED_OFFSET = 7_919  # validation noise never shares a stream with training noise


def load_bundle(model: dict[str, Any], dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> FluxBundle:
    """The model's parts; the transformer in `dtype` on `device` (default fp32, CPU), the rest fp32 on the CPU. A
    registered version's transformer stays fp32 (its merged weights exist nowhere else)."""
    registered = model.get("adapter")  # start from a registered version (downloaded by the driver)
    if model.get("preset"):
        bundle = build_preset(model["preset"], seed=model.get("seed", 0))
    else:
        bundle = load_flux(model["path"], transformer_dtype=None if registered else dtype, transformer_device=device)
    if registered:  # merged in fp32 and kept so: the first stage saves those exact values before it rounds them
        bundle.transformer = registered_transformer(registered, bundle.transformer).to(device)
        return bundle
    bundle.transformer = cast(bundle.transformer, dtype, device)
    return bundle


def load_transformer(model: dict[str, Any], dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> Any:
    """Only the transformer (with a latent cache a worker needs neither the VAE nor the text encoders), read
    straight into `dtype` on `device`: no full-precision host copy of a 12 B model per worker. The tiny preset
    is built in fp32 and cast (its canonical weights are then its values in `dtype`)."""
    if model.get("adapter"):  # start from a registered version (downloaded by the driver)
        return load_bundle(model, dtype, device).transformer
    if model.get("preset"):
        return build_preset(model["preset"], seed=model.get("seed", 0), dtype=dtype, device=device,
                            parts=("transformer",)).transformer
    from diffusers import FluxTransformer2DModel

    from fluxtune.flux.model import check_fill_layout

    transformer = FluxTransformer2DModel.from_pretrained(model["path"], subfolder="transformer",
                                                         local_files_only=True, **direct_load(dtype, device))
    check_fill_layout(transformer.config, where=f"{model['path']}/transformer")
    return transformer


def direct_load(dtype: torch.dtype | None, device: torch.device | None) -> dict[str, Any]:
    """from_pretrained arguments that read each tensor into `dtype` on `device` (a CUDA device directly)."""
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "low_cpu_mem_usage": True}
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device}
    return kwargs


def model_weights_folder(model: dict[str, Any]) -> str | None:
    """The folder the transformer's weights are read from (its exact values, whatever dtype it was loaded in);
    None for a preset or a registered version (built in memory)."""
    if model.get("path") and not model.get("adapter"):
        return os.path.join(model["path"], "transformer")
    return None


def encode_arrays(bundle: FluxBundle, arrays: dict[str, np.ndarray]) -> EncodedSet:
    prompts = [p if isinstance(p, str) else None for p in arrays.get("prompt", [None] * len(arrays["image"]))]
    return encode_examples(bundle, arrays["image"], arrays["mask"], arrays["target"], prompts)


def build_worker_setup(experiment: dict[str, Any], train: Any, val: EncodedSet, reporter: Reporter,
                       components: Any, device: torch.device, rank: int = 0, world_size: int = 1) -> WorkerSetup:
    loss = experiment["loss"]
    timesteps = experiment["timesteps"]
    return WorkerSetup(
        train=train.to(device),
        val=ValidationSet.build(val.to(device), seed=experiment["seed"] + VAL_NOISE_SEED_OFFSET),
        batch_size=experiment["data"]["batch_size"],
        guidance=experiment["model"]["guidance"],
        loss_fn=components.get("loss", loss["type"]).build(loss),
        timesteps=components.get("timestep_sampler", timesteps["type"]).build(timesteps),
        reporter=reporter,
        components=components,
        device=device,
        rank=rank,
        world_size=world_size,
        eval_every=experiment["eval_every"],
        sample_every=experiment.get("sample_every", 1),
        seed=experiment["seed"],
    )
