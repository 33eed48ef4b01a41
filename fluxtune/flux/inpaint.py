"""Inpainting with FluxFillPipeline itself, so what we score and ship is exactly what users run; the masked
scores (PSNR, SSIM inside the mask) the validation preview (fluxtune.flux.preview) reports."""

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


def masked_psnr(result: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) over the pixels inside the mask only: HxWx3 uint8 images, HxW mask in {0, 1}."""
    inside = mask.astype(bool)
    if not inside.any():
        raise ValueError("the mask is empty: nothing to score")
    error = (result.astype(np.float64) - target.astype(np.float64))[inside]
    mse = float(np.mean(error**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


SSIM_WINDOW = 7  # px; a uniform window with the sample covariance, as scikit-image's default SSIM


def _window_mean(image: np.ndarray, size: int = SSIM_WINDOW) -> np.ndarray:
    """Mean over the size×size window around each pixel (edges reflected), through a summed-area table."""
    half = size // 2
    padded = np.pad(image, ((half, half), (half, half)) + ((0, 0),) * (image.ndim - 2), mode="reflect")
    table = np.cumsum(np.cumsum(padded, axis=0), axis=1)
    table = np.pad(table, ((1, 0), (1, 0)) + ((0, 0),) * (image.ndim - 2))
    height, width = image.shape[:2]
    total = (table[size:size + height, size:size + width] - table[:height, size:size + width]
             - table[size:size + height, :width] + table[:height, :width])
    return total / (size * size)


def ssim_map(result: np.ndarray, target: np.ndarray, size: int = SSIM_WINDOW) -> np.ndarray:
    """Per-pixel SSIM of two HxWx3 uint8 images (8-bit range, K1 0.01, K2 0.03), averaged over channels."""
    x, y = result.astype(np.float64), target.astype(np.float64)
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mx, my = _window_mean(x, size), _window_mean(y, size)
    n = size * size
    unbias = n / (n - 1)
    vx = (_window_mean(x * x, size) - mx * mx) * unbias
    vy = (_window_mean(y * y, size) - my * my) * unbias
    cxy = (_window_mean(x * y, size) - mx * my) * unbias
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.mean(axis=2) if ssim.ndim == 3 else ssim


def masked_ssim(result: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """SSIM (structure, contrast and brightness; 1 = identical) averaged over the pixels inside the mask: the
    windows see the surroundings too, as a person judging how well the fill blends in does. PSNR counts only
    pixel errors; a blurry fill scores better there than it looks, and worse here."""
    inside = mask.astype(bool)
    if not inside.any():
        raise ValueError("the mask is empty: nothing to score")
    side = min(result.shape[:2])
    size = min(SSIM_WINDOW, side if side % 2 else side - 1)  # tiny images: the largest odd window that fits
    if size < 3:
        raise ValueError(f"image of {result.shape[1]}x{result.shape[0]} px is too small for SSIM")
    return float(ssim_map(result, target, size)[inside].mean())
