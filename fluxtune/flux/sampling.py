"""FluxFillPipeline's sampling on already-encoded inputs: the one denoising loop behind the validation preview.

No pixels and no text encoders: it works from the encoded validation examples (also with the latent cache), with
the same transformer calls, shifted sigmas and Euler steps as the pipeline (tests/test_training_probe.py compares
them with FluxFillPipeline itself).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import numpy as np
import torch


def load_vae(model: Mapping[str, Any]) -> Any:
    """The frozen VAE of a `model:` config, without the transformer or text encoders (they can be 20 GB)."""
    if model.get("preset"):
        from fluxtune.flux.model import build_preset

        return build_preset(model["preset"], seed=model.get("seed", 0), parts=("vae",)).vae
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.fspath(model["path"]), subfolder="vae", local_files_only=True)
    return vae.requires_grad_(False).eval()


def load_scheduler(model: Mapping[str, Any]) -> Any:
    """The model's flow-matching scheduler: its own folder's config, else FLUX.1's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxtune.flux import presets

    folder = None if model.get("preset") else os.path.join(model["path"], "scheduler")
    if folder and os.path.isdir(folder):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
    return FlowMatchEulerDiscreteScheduler(**presets.FLUX_SCHEDULER)


def unpack_pixel_mask(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of `fluxtune.flux.packing.pack_mask`: [B, seq, 256] → [B, 1, H, W]."""
    from fluxtune.flux.packing import unpack_latents

    f = vae_scale_factor
    blocks = unpack_latents(packed, height, width, f)  # [B, f*f, H/f, W/f]
    batch, _, rows, cols = blocks.shape
    blocks = blocks.reshape(batch, f, f, rows, cols).permute(0, 3, 1, 4, 2)  # B, h, f, w, f
    return blocks.reshape(batch, 1, rows * f, cols * f)


def sampling_schedule(scheduler: Any, steps: int, image_seq_len: int):
    """FluxFillPipeline's timesteps: sigmas linspace(1, 1/steps) shifted by μ(image tokens) (`retrieve_timesteps`)."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates it
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


@torch.no_grad()
def sample_fill_latents(transformer: Any, scheduler: Any, batch: dict[str, torch.Tensor], noise: torch.Tensor,
                        steps: int, guidance: float) -> torch.Tensor:
    """FluxFillPipeline's denoising loop on already-encoded inputs (packed noise, 320-channel conditioning, prompt
    embeddings): the same transformer calls and Euler steps, without pixels or text encoders."""
    scheduler = sampling_schedule(scheduler, steps, noise.shape[1])
    latents = noise
    size = latents.shape[0]
    guidance_vector = torch.full((size,), guidance, device=latents.device, dtype=torch.float32)
    for t in scheduler.timesteps:
        timestep = t.expand(size).to(latents.dtype)
        velocity = transformer(
            hidden_states=torch.cat((latents, batch["cond"].to(latents)), dim=2), timestep=timestep / 1000,
            guidance=guidance_vector, pooled_projections=batch["pooled"], encoder_hidden_states=batch["prompt_embeds"],
            txt_ids=batch["txt_ids"], img_ids=batch["img_ids"], return_dict=False)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def decode_to_uint8(vae: Any, packed: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Packed latents → [B, H, W, 3] uint8, as the pipeline's decode and postprocess (clamp of x/2 + 0.5)."""
    from fluxtune.flux.packing import unpack_latents, vae_decode, vae_scale_factor

    pixels = vae_decode(vae, unpack_latents(packed, height, width, vae_scale_factor(vae)))
    images = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (images * 255).round().astype(np.uint8)
