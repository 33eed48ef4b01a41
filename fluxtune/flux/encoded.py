"""Examples encoded once into the tensors a training step needs (latents, Fill conditioning, prompt embeddings).

Encoding happens once per dataset (the latent cache, `fluxtune.data.latent_cache`, via `LatentEncoder` and
`PromptEncoder` in Ray Data) or once per worker (`encode_examples`), so the training loop never touches images
or the VAE. Prompt embeddings are stored once per distinct prompt (T5 embeddings are 4 MB per row on the real
model); index 0 of the prompt table is always the empty prompt.

With aspect-ratio buckets the examples come in several sizes: a `BucketedSet` holds one `EncodedSet` per size,
and every batch is drawn from a single one (one token count, one `img_ids`), for training and validation alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
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
        return replace(self, **{f: getattr(self, f).to(device) for f in self.__dataclass_fields__})

    @property
    def parts(self) -> list["EncodedSet"]:
        """The single-size groups batches are drawn from (see BucketedSet): just this set."""
        return [self]


@dataclass
class BucketedSet:
    """Examples of several sizes (aspect-ratio buckets): one EncodedSet per size, sharing the prompt table.

    Example i counts through the buckets in order; `batch` takes indices of a single bucket only.
    """

    buckets: list[EncodedSet]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    @property
    def parts(self) -> list[EncodedSet]:
        return self.buckets

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        start = 0
        for bucket in self.buckets:
            inside = (index >= start) & (index < start + len(bucket))
            if bool(inside.all()):
                return bucket.batch(index - start)
            if bool(inside.any()):
                raise ValueError("a batch must come from a single bucket (one image size)")
            start += len(bucket)
        raise IndexError(f"indices {index.tolist()} out of range for {len(self)} examples")

    def to(self, device: torch.device) -> "BucketedSet":
        return BucketedSet([bucket.to(device) for bucket in self.buckets])


def preview_batch(data: Any, count: int) -> dict[str, torch.Tensor]:
    """Up to `count` fixed examples of one size, for sample grids and the inpainting probe: the first examples,
    of the largest bucket when there are several. Takes an EncodedSet, a BucketedSet or a ValidationSet."""
    data = getattr(data, "data", data)
    part = max(data.parts, key=len)  # max keeps the first of equals: stable across runs
    return part.batch(torch.arange(min(count, len(part)), device=part.x0.device))


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


def latent_scale(seq_len: int, height: int, width: int | None = None) -> int:
    """Pixels per latent cell, recovered from an image's token count: seq = (height / 2f)(width / 2f)."""
    width = height if width is None else width
    f = math.isqrt(height * width // (4 * seq_len)) if seq_len else 0
    if not f or 4 * f * f * seq_len != height * width or height % (2 * f) or width % (2 * f):
        raise ValueError(f"{seq_len} tokens do not fit a {width}x{height} image")
    return f


def encoded_from_columns(rows: Mapping[str, np.ndarray], prompts: Mapping[str, np.ndarray],
                         resolution: int) -> EncodedSet | BucketedSet:
    """An EncodedSet from latent-cache columns (x0, cond, prompt_index) and its prompt table (prompt_index,
    prompt_embeds, pooled); no model needed. Rows keep the order given. Rows with `height`/`width` columns
    (aspect-ratio buckets) give a BucketedSet: one EncodedSet per size, sizes in order of first appearance."""
    order = np.argsort(prompts["prompt_index"])
    if not np.array_equal(np.asarray(prompts["prompt_index"])[order], np.arange(len(order))):
        raise ValueError("the prompt table must hold each index 0..P-1 exactly once")
    prompt_embeds = torch.from_numpy(np.ascontiguousarray(np.stack(prompts["prompt_embeds"])[order], np.float32))
    pooled = torch.from_numpy(np.ascontiguousarray(np.stack(prompts["pooled"])[order], np.float32))

    def one_size(select: Any, height: int, width: int) -> EncodedSet:
        x0 = np.stack(list(rows["x0"][select]))
        return EncodedSet(
            x0=torch.from_numpy(np.ascontiguousarray(x0, np.float32)),
            cond=torch.from_numpy(np.ascontiguousarray(np.stack(list(rows["cond"][select])), np.float32)),
            prompt_index=torch.from_numpy(np.asarray(rows["prompt_index"][select], dtype=np.int64)),
            prompt_embeds=prompt_embeds, pooled=pooled,
            img_ids=latent_image_ids(height, width, latent_scale(x0.shape[1], height, width)),
            txt_ids=text_ids(prompt_embeds.shape[1]),
        )

    if "height" not in rows:
        return one_size(slice(None), resolution, resolution)
    sizes = list(zip(np.asarray(rows["height"]).tolist(), np.asarray(rows["width"]).tolist()))
    distinct = list(dict.fromkeys(sizes))
    return BucketedSet([one_size(np.array([s == size for s in sizes]), *size) for size in distinct])


def _encoding_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_text_bundle(model: Mapping[str, Any]) -> FluxBundle:
    """A FluxBundle with only the text encoders and tokenizers loaded (what `encode_prompts` needs)."""
    if model.get("preset"):
        from fluxtune.flux.model import build_preset

        return build_preset(model["preset"], seed=model.get("seed", 0), parts=("text",))
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
        from fluxtune.flux.sampling import load_vae

        self.vae = load_vae(model).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = {k: v for k, v in batch.items() if k not in ("image", "mask", "target")}
        if batch["image"].dtype != object:  # one size: a single VAE call
            x0, cond = self._encode(batch["image"], batch["mask"], batch["target"])
            return {**kept, "x0": x0, "cond": cond}
        # Rows of several buckets (a ragged batch): one VAE call per size, rows back in their order.
        from fluxtune.data.images import stack_rows

        x0_rows: list[Any] = [None] * len(batch["image"])
        cond_rows: list[Any] = [None] * len(batch["image"])
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(batch["image"]):
            by_shape.setdefault(image.shape, []).append(i)
        for rows in by_shape.values():
            x0, cond = self._encode(*(np.stack([batch[k][i] for i in rows]) for k in ("image", "mask", "target")))
            for j, i in enumerate(rows):
                x0_rows[i], cond_rows[i] = x0[j], cond[j]
        return {**kept, "x0": stack_rows(x0_rows), "cond": stack_rows(cond_rows)}

    def _encode(self, image: np.ndarray, mask: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image, mask, target = (torch.from_numpy(np.ascontiguousarray(a)).float().to(self.device)
                               for a in (image, mask, target))
        x0 = pack_latents(vae_encode(self.vae, target, sample=False)).float().cpu().numpy()
        cond = fill_conditioning(self.vae, image, mask, sample=False).float().cpu().numpy()
        return x0, cond


class PromptEncoder:
    """Ray Data `map_batches` class: prompt strings → prompt_embeds and pooled ("" gives the empty embedding)."""

    def __init__(self, model: Mapping[str, Any]):
        self.bundle = load_text_bundle(model)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeds, pooled = encode_prompts(self.bundle, [str(p) for p in batch["prompt"]])
        return {**batch, "prompt_embeds": embeds.float().cpu().numpy(), "pooled": pooled.float().cpu().numpy()}


def random_batches(data: EncodedSet | BucketedSet, batch_size: int, generator: torch.Generator
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a fresh permutation per epoch); batches never straddle epochs.

    Buckets: each is shuffled and cut into batches on its own (a bucket smaller than `batch_size` gives one
    smaller batch), then the epoch's batches are shuffled together, so every batch has a single image size.
    """
    if isinstance(data, EncodedSet):
        n = len(data)
        size = min(batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - size + 1, size):
                yield data.batch(order[start:start + size].to(data.x0.device))
    while True:
        epoch = []
        for bucket in data.buckets:
            n, size = len(bucket), min(batch_size, len(bucket))
            order = torch.randperm(n, generator=generator)
            epoch += [(bucket, order[start:start + size]) for start in range(0, n - size + 1, size)]
        for k in torch.randperm(len(epoch), generator=generator).tolist():
            bucket, index = epoch[k]
            yield bucket.batch(index.to(bucket.x0.device))


@dataclass
class ValidationSet:
    """Held-out examples with fixed noise and timesteps, so the same weights always score the same."""

    data: EncodedSet | BucketedSet
    noise: torch.Tensor | list[torch.Tensor]  # one tensor per bucket for a BucketedSet
    t: torch.Tensor

    @classmethod
    def build(cls, data: EncodedSet | BucketedSet, seed: int) -> "ValidationSet":
        generator = torch.Generator().manual_seed(seed)
        noise = [torch.randn(part.x0.shape, generator=generator) for part in data.parts]
        t = torch.linspace(0.05, 0.95, len(data)) if len(data) > 1 else torch.tensor([0.5])
        t = t[torch.randperm(len(data), generator=generator)]  # spread of t over examples, not sorted by index
        device = data.parts[0].x0.device
        noise = [n.to(device) for n in noise]
        return cls(data, noise[0] if isinstance(data, EncodedSet) else noise, t.to(device))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        """(batch, noise, t) over every example in order, each batch from a single bucket."""
        noises = [self.noise] if isinstance(self.data, EncodedSet) else self.noise
        offset = 0
        for part, noise in zip(self.data.parts, noises, strict=True):
            for start in range(0, len(part), batch_size):
                index = torch.arange(start, min(start + batch_size, len(part)), device=part.x0.device)
                yield part.batch(index), noise[index], self.t[offset + index]
            offset += len(part)
