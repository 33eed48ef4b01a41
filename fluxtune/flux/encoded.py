"""Examples encoded once into the tensors a training step needs (latents, Fill conditioning, prompt embeddings).

Encoding happens once per worker and trial, so the training loop never touches images or the VAE.
Prompt embeddings are stored once per distinct prompt (T5 embeddings are 4 MB per row on the real model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fluxtune.flux.model import FluxBundle, empty_prompt_embeds, encode_prompts
from fluxtune.flux.packing import (
    fill_conditioning,
    latent_image_ids,
    pack_latents,
    text_ids,
    vae_encode,
    vae_scale_factor,
)


@dataclass
class EncodedSet:
    x0: torch.Tensor  # [N, seq, 64] packed target latents
    cond: torch.Tensor  # [N, seq, 320] packed masked-image latents ++ packed mask
    prompt_index: torch.Tensor  # [N] row → prompt table index
    prompt_embeds: torch.Tensor  # [P, L, joint_dim]
    pooled: torch.Tensor  # [P, pooled_dim]
    img_ids: torch.Tensor  # [seq, 3]
    txt_ids: torch.Tensor  # [L, 3]

    def __len__(self) -> int:
        return self.x0.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.prompt_index[index]
        return {
            "x0": self.x0[index],
            "cond": self.cond[index],
            "mask": self.cond[index][..., 64:],
            "prompt_embeds": self.prompt_embeds[p],
            "pooled": self.pooled[p],
            "img_ids": self.img_ids,
            "txt_ids": self.txt_ids,
        }

    def to(self, device: torch.device) -> "EncodedSet":
        return EncodedSet(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@torch.no_grad()
def encode_examples(bundle: FluxBundle, image: np.ndarray, mask: np.ndarray, target: np.ndarray,
                    prompts: list[str | None], batch_size: int = 16) -> EncodedSet:
    """image/target [N,3,H,W] in [-1,1], mask [N,1,H,W] in {0,1} → an EncodedSet on the CPU.

    Latents use the distribution mean (not a sample) so the same image always gives the same tensors.
    """
    vae = bundle.vae
    x0, cond = [], []
    for start in range(0, len(image), batch_size):
        sl = slice(start, start + batch_size)
        img = torch.from_numpy(np.ascontiguousarray(image[sl])).float()
        msk = torch.from_numpy(np.ascontiguousarray(mask[sl])).float()
        tgt = torch.from_numpy(np.ascontiguousarray(target[sl])).float()
        x0.append(pack_latents(vae_encode(vae, tgt, sample=False)).float().cpu())
        cond.append(fill_conditioning(vae, img, msk, sample=False).float().cpu())

    table = sorted({p for p in prompts if p})
    embeds, pooled = [], []
    empty_embeds, empty_pooled = empty_prompt_embeds(bundle)
    embeds.append(empty_embeds)
    pooled.append(empty_pooled)
    if table:
        e, pl = encode_prompts(bundle, table)
        embeds.append(e)
        pooled.append(pl)
    position = {p: i + 1 for i, p in enumerate(table)}
    prompt_index = torch.tensor([position.get(p, 0) if p else 0 for p in prompts], dtype=torch.long)
    height, width = image.shape[-2:]
    prompt_embeds = torch.cat(embeds).float().cpu()
    return EncodedSet(
        x0=torch.cat(x0), cond=torch.cat(cond), prompt_index=prompt_index,
        prompt_embeds=prompt_embeds, pooled=torch.cat(pooled).float().cpu(),
        img_ids=latent_image_ids(height, width, vae_scale_factor(vae)),
        txt_ids=text_ids(prompt_embeds.shape[1]),
    )


def random_batches(data: EncodedSet, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a fresh permutation per epoch); batches never straddle epochs."""
    n = len(data)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield data.batch(order[start:start + size].to(data.x0.device))


@dataclass
class ValidationSet:
    """Held-out examples with fixed noise and timesteps, so the same weights always score the same."""

    data: EncodedSet
    noise: torch.Tensor
    t: torch.Tensor

    @classmethod
    def build(cls, data: EncodedSet, seed: int) -> "ValidationSet":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(data.x0.shape, generator=generator)
        t = torch.linspace(0.05, 0.95, len(data)) if len(data) > 1 else torch.tensor([0.5])
        t = t[torch.randperm(len(data), generator=generator)]  # spread of t over examples, not sorted by index
        return cls(data, noise.to(data.x0.device), t.to(data.x0.device))
