"""How far FluxFillPipeline's sampled masked-image latents lie from the posterior mean the latent cache stores.

`FluxFillPipeline.prepare_mask_latents` encodes the masked image with `latent_dist.sample(generator)`; the cache
(`fluxtune.flux.encoded`) stores `latent_dist.mode()`, the mean. The gap is the posterior's standard deviation,
in the transformer's units (`(z - shift) * scaling`). Compared with the spread of the latents themselves and with
bf16's rounding step, it says whether conditioning on the mean teaches the model anything the pipeline does not
show it at inference.

    python benchmarks/vae_posterior.py                          # FLUX.1's VAE architecture, random init
    python benchmarks/vae_posterior.py --vae /models/FLUX.1-Fill-dev/vae   # the trained VAE, when you have it

Random init is not the trained VAE: its log-variance head outputs about 0 (std ≈ 1), which a trained KL-VAE with
FLUX.1's tiny KL weight drives far below 0. The script reports both sides so the trained numbers can be read the
same way (docs/data.md, "Masked-image latents: the mean").
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

# FLUX.1's AutoencoderKL (black-forest-labs/FLUX.1-dev vae/config.json): 4 blocks, 16 latent channels, no quant convs.
FLUX1_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611,
                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                 mid_block_add_attention=True)
BF16_RELATIVE_STEP = 2.0 ** -8  # bf16 keeps 8 significant bits: a value moves by up to this fraction when stored


def masked_images(n: int, resolution: int, seed: int) -> torch.Tensor:
    """Generated sample examples (fluxtune's own dataset), masked as the pipeline masks them: image × (1 − mask)."""
    from fluxtune.data.sample import make_example

    out = []
    for index in range(n):
        source, mask, _, _ = make_example(index, resolution, seed)
        pixels = torch.from_numpy(source).permute(2, 0, 1).float() / 127.5 - 1.0
        hole = torch.from_numpy((mask >= 128).astype(np.float32))[None]
        out.append(pixels * (1 - hole))
    return torch.stack(out)


def measure(vae, images: torch.Tensor, seed: int) -> dict[str, float]:
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mean = (posterior.mean - shift) * scale
        sampled = (posterior.sample(torch.Generator().manual_seed(seed)) - shift) * scale
    std = posterior.std * scale  # in the transformer's units
    gap = (sampled - mean).flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1)
    return {"posterior std (median)": float(std.median()), "posterior std (max)": float(std.max()),
            "log-variance (median)": float(posterior.logvar.median()),
            "latent spread (std of means)": float(mean.std()),
            "relative gap |sample - mean| / |mean|": statistics.median(gap.tolist()),
            "bf16 relative rounding step": BF16_RELATIVE_STEP}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="a trained diffusers AutoencoderKL folder "
                                      "(default: FLUX.1's config, random init)")
    parser.add_argument("--n", type=int, default=4, help="examples")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else AutoencoderKL(**FLUX1_VAE)
    vae.eval()
    figures = measure(vae, masked_images(args.n, args.resolution, args.seed), args.seed)
    label = args.vae or "FLUX.1 AutoencoderKL config, random init"
    print(f"{label}: {args.n} masked images at {args.resolution} px, {sum(p.numel() for p in vae.parameters()):,} "
          "parameters")
    for name, value in figures.items():
        print(f"  {name:40s} {value:.4g}")
    # For the trained VAE: the gap matters only if it is not far below bf16's rounding and the latents' spread.
    gap = figures["relative gap |sample - mean| / |mean|"]
    verdict = "negligible" if gap < BF16_RELATIVE_STEP else "NOT negligible"
    print(f"  sampling instead of the mean: {verdict} for this VAE")


if __name__ == "__main__":
    main()
