"""Inpainting with FluxFillPipeline itself, so what we score and ship is exactly what users run."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from PIL import Image

from fluxtune.flux.model import FluxBundle, empty_prompt_embeds, encode_prompts


def fill_pipeline(bundle: FluxBundle, transformer: Any | None = None):
    from diffusers import FluxFillPipeline

    return FluxFillPipeline(
        scheduler=copy.deepcopy(bundle.scheduler),  # the pipeline mutates its scheduler's timesteps
        vae=bundle.vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer if transformer is not None else bundle.transformer,
    )


@torch.no_grad()
def inpaint(bundle: FluxBundle, pipeline: Any, images: list[Image.Image], masks: list[Image.Image],
            prompts: list[str | None] | None = None, steps: int = 8, guidance: float = 30.0,
            seed: int = 0) -> list[np.ndarray]:
    """RGB images + masks (white = repaint) → inpainted uint8 HxWx3 arrays."""
    prompts = prompts or [None] * len(images)
    out = []
    for image, mask, prompt in zip(images, masks, prompts, strict=True):
        embeds, pooled = encode_prompts(bundle, [prompt]) if prompt else empty_prompt_embeds(bundle)
        width, height = image.size
        result = pipeline(
            image=image.convert("RGB"), mask_image=mask.convert("L"), height=height, width=width,
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps,
            guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]
        out.append((np.clip(result, 0, 1) * 255).round().astype(np.uint8))
    return out
