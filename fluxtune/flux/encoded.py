"""Examples encoded once into the tensors a training step needs (latents, Fill conditioning, prompt embeddings).

Encoding happens once per dataset (the latent cache, `fluxtune.data.latent_cache`, via `LatentEncoder` and
`PromptEncoder` in Ray Data) or once per worker (`encode_examples`), so the training loop never touches images
or the VAE. Prompt embeddings are stored once per distinct prompt (T5 embeddings are 4 MB per row on the real
model); index 0 of the prompt table is always the empty prompt.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

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


def latent_scale(seq_len: int, resolution: int) -> int:
    """Pixels per latent cell, recovered from a square image's token count: seq = (resolution / (2 f))²."""
    side = math.isqrt(seq_len)
    if side * side != seq_len or resolution % (2 * side):
        raise ValueError(f"{seq_len} tokens do not fit a {resolution}x{resolution} image")
    return resolution // (2 * side)


def encoded_from_columns(rows: Mapping[str, np.ndarray], prompts: Mapping[str, np.ndarray],
                         resolution: int) -> EncodedSet:
    """An EncodedSet from latent-cache columns (x0, cond, prompt_index) and its prompt table (prompt_index,
    prompt_embeds, pooled); no model needed. Rows keep the order given."""
    scale = latent_scale(np.asarray(rows["x0"][0]).shape[0], resolution)
    order = np.argsort(prompts["prompt_index"])
    if not np.array_equal(np.asarray(prompts["prompt_index"])[order], np.arange(len(order))):
        raise ValueError("the prompt table must hold each index 0..P-1 exactly once")
    prompt_embeds = torch.from_numpy(np.ascontiguousarray(np.stack(prompts["prompt_embeds"])[order], np.float32))
    return EncodedSet(
        x0=torch.from_numpy(np.ascontiguousarray(np.stack(rows["x0"]), np.float32)),
        cond=torch.from_numpy(np.ascontiguousarray(np.stack(rows["cond"]), np.float32)),
        prompt_index=torch.from_numpy(np.asarray(rows["prompt_index"], dtype=np.int64)),
        prompt_embeds=prompt_embeds,
        pooled=torch.from_numpy(np.ascontiguousarray(np.stack(prompts["pooled"])[order], np.float32)),
        img_ids=latent_image_ids(resolution, resolution, scale),
        txt_ids=text_ids(prompt_embeds.shape[1]),
    )


def _encoding_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_vae(model: Mapping[str, Any]) -> Any:
    """The frozen VAE of a `model:` config, without the transformer or text encoders (they can be 20 GB)."""
    if model.get("preset") == "tiny-fill":
        from fluxtune.flux.model import build_tiny_fill

        return build_tiny_fill(seed=model.get("seed", 0)).vae
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.fspath(model["path"]), subfolder="vae", local_files_only=True)
    return vae.requires_grad_(False).eval()


def load_text_bundle(model: Mapping[str, Any]) -> FluxBundle:
    """A FluxBundle with only the text encoders and tokenizers loaded (what `encode_prompts` needs)."""
    if model.get("preset") == "tiny-fill":
        from fluxtune.flux.model import build_tiny_fill

        return build_tiny_fill(seed=model.get("seed", 0))
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path, local = os.fspath(model["path"]), {"local_files_only": True}

    def part(loader: Any, subfolder: str) -> Any:
        if not os.path.isdir(os.path.join(path, subfolder)):
            return None
        if subfolder.startswith("tokenizer"):
            return loader.from_pretrained(os.path.join(path, subfolder), **local)
        return loader.from_pretrained(path, subfolder=subfolder, **local).requires_grad_(False).eval()

    return FluxBundle(transformer=None, vae=None, scheduler=None, source=path,
                      text_encoder=part(CLIPTextModel, "text_encoder"),
                      text_encoder_2=part(T5EncoderModel, "text_encoder_2"),
                      tokenizer=part(CLIPTokenizer, "tokenizer"), tokenizer_2=part(T5TokenizerFast, "tokenizer_2"))


class LatentEncoder:
    """Ray Data `map_batches` class: decoded arrays (image, mask, target) → x0 and cond, other columns kept.

    A class, so each Ray Data actor loads the VAE once and encodes many batches with it.
    """

    def __init__(self, model: Mapping[str, Any]):
        self.device = _encoding_device()
        self.vae = load_vae(model).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = torch.from_numpy(np.ascontiguousarray(batch["image"])).float().to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(batch["mask"])).float().to(self.device)
        target = torch.from_numpy(np.ascontiguousarray(batch["target"])).float().to(self.device)
        x0 = pack_latents(vae_encode(self.vae, target, sample=False)).float().cpu().numpy()
        cond = fill_conditioning(self.vae, image, mask, sample=False).float().cpu().numpy()
        kept = {k: v for k, v in batch.items() if k not in ("image", "mask", "target")}
        return {**kept, "x0": x0, "cond": cond}


class PromptEncoder:
    """Ray Data `map_batches` class: prompt strings → prompt_embeds and pooled ("" gives the empty embedding)."""

    def __init__(self, model: Mapping[str, Any]):
        self.bundle = load_text_bundle(model)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeds, pooled = encode_prompts(self.bundle, [str(p) for p in batch["prompt"]])
        return {**batch, "prompt_embeds": embeds.float().cpu().numpy(), "pooled": pooled.float().cpu().numpy()}


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
