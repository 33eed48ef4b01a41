"""Inpainting with FluxFillPipeline itself, so what we score and ship is exactly what users run."""

from __future__ import annotations

import copy
import os
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


class InpaintProbe:
    """A short inpainting of a few held-out examples, scored inside their masks: `masked_psnr` and `masked_ssim`.

    Works on the encoded validation examples (so also with the latent cache): FluxFillPipeline's sampling loop
    (`sample_fill_latents`, checked against the pipeline in tests) from fixed noise, decoded by the VAE, compared
    with the VAE decoding of the target latents — the best the VAE itself can give back. Fixed examples, noise and
    steps: the same weights always give the same number.
    """

    def __init__(self, vae: Any, scheduler: Any, val: Any, examples: int = 4, steps: int = 8, guidance: float = 30.0,
                 seed: int = 0):
        from fluxtune.flux.encoded import preview_batch

        self.batch = preview_batch(val, examples)  # one image size, also with aspect-ratio buckets
        self.vae, self.scheduler, self.steps, self.guidance = vae, scheduler, steps, guidance
        self.noise = torch.randn(self.batch["x0"].shape, generator=torch.Generator().manual_seed(seed)).to(
            self.batch["x0"])
        rows, cols = (int(v) + 1 for v in self.batch["img_ids"][:, 1:].max(dim=0).values)
        self.height, self.width = rows * 16, cols * 16
        self.masks = unpack_pixel_mask(self.batch["mask"], self.height, self.width)[:, 0].cpu().numpy() > 0.5
        self.targets = decode_to_uint8(vae, self.batch["x0"], self.height, self.width)

    @classmethod
    def for_worker(cls, model: dict[str, Any], val: Any, **kwargs: Any) -> "InpaintProbe":
        from diffusers import FlowMatchEulerDiscreteScheduler

        from fluxtune.flux import presets
        from fluxtune.flux.encoded import load_vae

        folder = None if model.get("preset") else os.path.join(model["path"], "scheduler")
        scheduler = (FlowMatchEulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
                     if folder and os.path.isdir(folder) else FlowMatchEulerDiscreteScheduler(**presets.FLUX_SCHEDULER))
        return cls(load_vae(model), scheduler, val, guidance=model.get("guidance", 30.0), **kwargs)

    def __call__(self, transformer: Any) -> dict[str, float]:
        was_training = transformer.training
        transformer.eval()
        try:
            latents = sample_fill_latents(transformer, self.scheduler, self.batch, self.noise, self.steps,
                                          self.guidance)
        finally:
            transformer.train(was_training)
        results = decode_to_uint8(self.vae, latents, self.height, self.width)
        scored = [(r, t, m) for r, t, m in zip(results, self.targets, self.masks) if m.any()]  # empty: nothing to score
        if not scored:
            return {}
        return {"masked_psnr": float(np.mean([masked_psnr(*example) for example in scored])),
                "masked_ssim": float(np.mean([masked_ssim(*example) for example in scored]))}
