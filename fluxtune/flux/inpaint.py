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


def masked_psnr(result: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) over the pixels inside the mask only: HxWx3 uint8 images, HxW mask in {0, 1}."""
    inside = mask.astype(bool)
    if not inside.any():
        raise ValueError("the mask is empty: nothing to score")
    error = (result.astype(np.float64) - target.astype(np.float64))[inside]
    mse = float(np.mean(error**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """[3, H, W] in [-1, 1] → RGB image."""
    return Image.fromarray(((np.clip(pixels, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0))


class InpaintProbe:
    """A short FluxFillPipeline inpainting of a few held-out examples, scored by PSNR inside their masks.

    Fixed examples, seed and steps: the same weights always give the same number, so evaluations compare.
    """

    def __init__(self, bundle: FluxBundle, arrays: dict[str, np.ndarray], examples: int = 4, steps: int = 8,
                 guidance: float = 30.0, seed: int = 0):
        count = min(examples, len(arrays["image"]))
        self.bundle, self.steps, self.guidance, self.seed = bundle, steps, guidance, seed
        self.images = [_to_pil(arrays["image"][i]) for i in range(count)]
        self.masks = [Image.fromarray((arrays["mask"][i, 0] > 0.5).astype(np.uint8) * 255) for i in range(count)]
        self.targets = [np.asarray(_to_pil(arrays["target"][i])) for i in range(count)]
        prompts = arrays.get("prompt")
        self.prompts = [p if isinstance(p, str) and p else None for p in prompts[:count]] if prompts is not None \
            else [None] * count

    def __call__(self, transformer: Any) -> dict[str, float]:
        was_training = transformer.training
        transformer.eval()
        try:
            results = inpaint(self.bundle, fill_pipeline(self.bundle, transformer), self.images, self.masks,
                              self.prompts, steps=self.steps, guidance=self.guidance, seed=self.seed)
        finally:
            transformer.train(was_training)
        scores = [masked_psnr(r, t, np.asarray(m) > 127) for r, t, m in zip(results, self.targets, self.masks)]
        return {"masked_psnr": float(np.mean(scores))}
