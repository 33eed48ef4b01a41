"""Fit the tiny-fill preset's VAE and write fluxtune/flux/preset_weights/tiny_fill_vae.safetensors (seeded, CPU).

The tiny-fill VAE is not random: it is fitted once, here, to reconstruct the kind of images fluxtune's generated
sample data holds (gradients, palette discs and squares, grey holes) and shipped with the package, so every process
(driver, Ray Data encoders, Train workers, a registered pyfunc on another machine) loads the same bytes. Train
images come from sample seeds 1-5 (never seed 0, the dataset tests and the demo use), rotated and flipped: 32 px
crops of 64 px images and whole 32 px images (cheap). Loss: pixel MSE of decode(mode(encode(x))) plus a pull of the
normalised latents `(z - shift) * scale` towards zero mean and unit variance (FLUX.1's factors then fit, and the
transformer's flow matching sees unit-scale latents). The posterior's log-variance is then fixed at diffusers' floor
(-30, σ ≈ 3e-7), so sampling a latent (as FluxFillPipeline does) gives the mode.

    python scripts/fit_tiny_vae.py            # rewrite the weights (≈80 min, 2 cores); prints the sha256
    python scripts/fit_tiny_vae.py --check    # only report the PSNR of the shipped weights

The result is reproducible up to float summation order (thread count); the shipped file is the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from fluxtune.data.sample import HOLE_FILL, make_example
from fluxtune.flux import presets
from fluxtune.flux.model import preset_weights_path

OUT = preset_weights_path(presets.TINY_FILL_VAE_WEIGHTS)


def example_images(seed: int, count: int, resolution: int) -> np.ndarray:
    """Targets, sources and masked sources (hole at 0 in [-1, 1], as the Fill conditioning encodes) as [N,3,R,R]."""
    images = []
    for index in range(count):
        source, mask, target, _ = make_example(index, resolution, seed)
        masked = source.copy()
        masked[mask > 0] = 127.5  # source * (1 - mask) in [-1, 1] is 0 there
        images += [target, source, masked]
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB over uint8 pixel values (both in [-1, 1])."""
    to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = (to_uint8(reconstructed) - to_uint8(original)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images)
    out = vae.decode(vae.encode(x).latent_dist.mode(), return_dict=False)[0]
    return psnr(out, x).numpy()


def fit(steps: int, batch: int, seed: int) -> AutoencoderKL:
    torch.set_num_threads(1)  # small convolutions: a second thread costs more in synchronisation than it gains
    torch.manual_seed(seed)
    vae = AutoencoderKL(**presets.TINY_FILL_VAE).train()
    pools = {r: torch.from_numpy(np.concatenate([example_images(s, 200, r) for s in range(1, 6)]))
             for r in (32, 64)}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    shift, scale = presets.TINY_FILL_VAE["shift_factor"], presets.TINY_FILL_VAE["scaling_factor"]
    started = time.perf_counter()
    for step in range(steps):
        # 32 px crops of 64 px images cost a quarter of whole ones and keep their scale; every 4th batch is 32 px.
        resolution = 32 if step % 4 == 0 else 64
        pool = pools[resolution]
        x = pool[torch.randint(len(pool), (batch,), generator=generator)]
        if resolution == 64:
            top, left = (int(v) for v in torch.randint(0, 33, (2,), generator=generator))
            x = x[..., top:top + 32, left:left + 32]
        x = torch.rot90(x, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
        if torch.rand(1, generator=generator) < 0.5:
            x = x.flip(3)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mode(), return_dict=False)[0]
        normalised = (posterior.mean - shift) * scale
        latent_scale = normalised.mean().pow(2) + (normalised.var() - 1).pow(2)
        loss = (reconstruction - x).pow(2).mean() + 1e-3 * latent_scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.5f}  latent mean {normalised.mean().item():+.2f} "
                  f"std {normalised.std().item():.2f}  {time.perf_counter() - started:.0f} s", flush=True)
        if step % 500 == 499:
            vae.eval()
            print(f"  median PSNR at 64 px (seed 0, 16 examples): "
                  f"{np.median(reconstruction_psnr(vae, example_images(0, 16, 64))):.2f} dB", flush=True)
            vae.train()
    return vae.eval()


@torch.no_grad()
def finish(vae: AutoencoderKL, images: torch.Tensor) -> AutoencoderKL:
    """Fix the posterior's log-variance at diffusers' floor (the second half of conv_out's channels), and scale each
    latent channel so that normalised latents have unit variance on `images`: the encoder's mean output is multiplied
    by a, the decoder's first convolution divided by it, so reconstructions are unchanged (zero padding stays zero)."""
    latent = presets.TINY_FILL_VAE["latent_channels"]
    conv_out, conv_in = vae.encoder.conv_out, vae.decoder.conv_in
    conv_out.weight[latent:] = 0
    conv_out.bias[latent:] = -30.0
    z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    a = 1.0 / (z.transpose(0, 1).flatten(1).std(dim=1) * presets.TINY_FILL_VAE["scaling_factor"])
    conv_out.weight[:latent] *= a[:, None, None, None]
    conv_out.bias[:latent] *= a
    conv_in.weight /= a[None, :, None, None]
    return vae


def report(vae: AutoencoderKL) -> float:
    medians = {}
    for resolution in (64, 32):
        images = example_images(0, 64, resolution)
        scores = reconstruction_psnr(vae, images)
        medians[resolution] = float(np.median(scores))
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(images)).latent_dist.mode()
        normalised = (z - presets.TINY_FILL_VAE["shift_factor"]) * presets.TINY_FILL_VAE["scaling_factor"]
        print(f"seed-0 sample data at {resolution} px: median PSNR {medians[resolution]:.2f} dB, "
              f"min {scores.min():.2f} dB; normalised latents mean {normalised.mean():+.2f} std {normalised.std():.2f}")
    return medians[64]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps on 32 px crops")
    parser.add_argument("--resume", type=Path, help="skip fitting: only finish these weights")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only report the shipped weights' PSNR")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.check:
        from fluxtune.flux.model import build_preset

        report(build_preset("tiny-fill", parts=("vae",)).vae)
        return
    if args.resume:
        vae = AutoencoderKL(**presets.TINY_FILL_VAE)
        vae.load_state_dict(load_file(str(args.resume)))
    else:
        vae = fit(args.steps, args.batch, args.seed)
    vae = finish(vae.eval(), torch.from_numpy(np.concatenate([example_images(s, 200, 64) for s in range(1, 6)])))
    report(vae)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(args.out))
    print(f"wrote {args.out} ({sum(p.numel() for p in vae.parameters()):,} params), "
          f"sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
