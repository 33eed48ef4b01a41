"""The FLUX.1-Fill input layout, written out plainly.

The reference is diffusers' `FluxFillPipeline` (`_pack_latents`, `_unpack_latents`, `prepare_mask_latents`,
`_prepare_latent_image_ids`, `encode_prompt`'s text ids and the denoising loop's `torch.cat`); tests/test_packing.py
compares these functions with the pipeline's own, tensor for tensor. Training must feed the transformer exactly
what inference will, or a fine-tuned model learns a layout it never sees again.

Shapes, for an image of H x W pixels and a VAE that downsamples by f = 8:
    latents      [B, 16, H/8, W/8]      -> packed 2x2  [B, (H/16)(W/16), 64]
    mask         [B, 1, H, W]           -> 8x8 blocks  [B, 64, H/8, W/8] -> packed [B, (H/16)(W/16), 256]
    conditioning = packed masked-image latents (64) ++ packed mask (256)               = 320 channels
    transformer hidden_states = packed noisy latents (64) ++ conditioning (320)          = 384 channels
"""

import torch


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 per down block after the first, as the pipeline computes it (8 for FLUX)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(height: int, width: int, vae_scale_factor: int = 8) -> None:
    """Packing pairs latent cells 2x2, so pixel sizes must be multiples of 2 * vae_scale_factor (16 for FLUX)."""
    multiple = 2 * vae_scale_factor
    if height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} must be a multiple of {multiple} in both dimensions")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 patch of latent cells becomes one token (channel-major)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # B, h/2, w/2, C, 2, 2
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of `pack_latents`; `height`/`width` are in pixels, as in the pipeline."""
    batch, _, packed_channels = packed.shape
    latent_height = 2 * (height // (vae_scale_factor * 2))
    latent_width = 2 * (width // (vae_scale_factor * 2))
    patches = packed.reshape(batch, latent_height // 2, latent_width // 2, packed_channels // 4, 2, 2)
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # B, C, h/2, 2, w/2, 2
    return patches.reshape(batch, packed_channels // 4, latent_height, latent_width)


def pack_mask(mask: torch.Tensor, vae_scale_factor: int = 8) -> torch.Tensor:
    """[B, 1, H, W] pixel mask -> [B, (H/16)(W/16), 256].

    The mask is not downsampled: each f x f pixel block under a latent cell becomes f*f channels of that cell
    (64 for f = 8), so the model sees the exact mask edge; then the cells are packed 2x2 like the latents.
    """
    batch, _, height, width = mask.shape
    check_resolution(height, width, vae_scale_factor)
    f = vae_scale_factor
    latent_height, latent_width = height // f, width // f
    blocks = mask[:, 0].reshape(batch, latent_height, f, latent_width, f)
    blocks = blocks.permute(0, 2, 4, 1, 3)  # B, f, f, h, w: the pixel offset inside a block becomes a channel
    blocks = blocks.reshape(batch, f * f, latent_height, latent_width)
    return pack_latents(blocks)


def vae_encode(
    vae, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Pixels in [-1, 1] -> normalised latents `(z - shift_factor) * scaling_factor`.

    FluxFillPipeline.prepare_mask_latents uses `retrieve_latents(...)` with its default sample_mode "sample",
    i.e. `latent_dist.sample(generator)`, not the mean; `sample=True` matches it (same generator state -> same
    tensor). `sample=False` takes the distribution's mode (its mean) for deterministic cached latents.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    distribution = vae.encode(pixels).latent_dist
    latents = distribution.sample(generator) if sample else distribution.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] -> pixels (about [-1, 1], not clamped), undoing `vae_encode`."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


def fill_conditioning(
    vae,
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """The 320 conditioning channels: packed masked-image latents (64) then packed mask (256), the pipeline's order.

    image: [B, 3, H, W] in [-1, 1]; mask: [B, 1, H, W] in {0, 1}, 1 = repaint (binarise it first, as the
    pipeline's mask processor does). The masked image keeps only what must be preserved: image * (1 - mask).
    """
    mask = mask.to(device=image.device, dtype=image.dtype)
    masked_image_latents = vae_encode(vae, image * (1 - mask), generator=generator, sample=sample)
    packed_mask = pack_mask(mask, vae_scale_factor(vae)).to(masked_image_latents)
    return torch.cat((pack_latents(masked_image_latents), packed_mask), dim=-1)


def latent_image_ids(
    height: int,
    width: int,
    vae_scale_factor: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[(H/16)(W/16), 3] rotary position ids of the image tokens: (0, row, column) per packed token."""
    check_resolution(height, width, vae_scale_factor)
    rows, columns = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def text_ids(
    seq_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[seq_len, 3] position ids of the text tokens: all zero, so RoPE leaves text tokens unrotated."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def transformer_inputs(noisy_packed: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """The transformer's 384-channel hidden_states: packed noisy latents (64) first, then conditioning (320)."""
    if noisy_packed.shape[:2] != conditioning.shape[:2]:
        raise ValueError(
            f"noisy latents {tuple(noisy_packed.shape)} and conditioning {tuple(conditioning.shape)} "
            "must share batch size and token count"
        )
    return torch.cat((noisy_packed, conditioning.to(noisy_packed)), dim=2)
