"""Sample-image grids: what the model paints at each evaluation, so people look instead of read.

One row per validation example: source (what the model sees: the masked source) | mask | prediction | target.
Rendered in the worker (rank 0) from the *encoded* validation examples the evaluation already uses, so it works
with the latent cache too (no pixels, no text encoders in the worker): the prediction is a short flow-matching
Euler sampling with FLUX's shifted sigmas, exactly the transformer inputs FluxFillPipeline builds
(fluxtune.flux.flow), and every panel is a VAE decode (the mask is unpacked exactly from its 256 channels).

The PNG rides to the driver with the next Tune report, like the buffered step metrics, and the driver's MLflow
callback logs it: no shared filesystem is assumed. Panels are capped at PANEL_MAX px and rows at MAX_EXAMPLES so
a report stays small even for 1024² data. No mlflow import here: this module runs inside Ray workers.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

MAX_EXAMPLES = 4
PANEL_MAX = 256  # px; a grid is at most 4 × 256 wide
SAMPLES_KEY = "fluxtune_samples"  # report key: JSON list of base64 PNGs, unpacked by the tracking callback


def _to_uint8(array: np.ndarray, signed: bool = True) -> np.ndarray:
    """CHW in [-1, 1] (images; `signed`) or [0, 1] (masks) → HWC uint8 RGB."""
    chw = np.asarray(array, dtype=np.float32)
    if signed:
        chw = (chw + 1.0) / 2.0
    hwc = np.clip(chw, 0.0, 1.0).transpose(1, 2, 0)
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    return (hwc * 255).round().astype(np.uint8)


def grid_png(rows: list[list[np.ndarray]], panel_max: int = PANEL_MAX) -> bytes:
    """HWC uint8 panels, one list per row → one PNG, every panel scaled to the same size (≤ panel_max)."""
    from PIL import Image

    height, width = rows[0][0].shape[:2]
    scale = min(1.0, panel_max / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (columns * size[0], len(rows) * size[1]), "black")
    for y, row in enumerate(rows):
        for x, panel in enumerate(row):
            canvas.paste(Image.fromarray(panel).resize(size, Image.NEAREST), (x * size[0], y * size[1]))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_samples(pngs: list[bytes]) -> str:
    return json.dumps([base64.b64encode(p).decode("ascii") for p in pngs])


def decode_samples(value: str | None) -> list[bytes]:
    return [base64.b64decode(p) for p in json.loads(value or "[]")]


def flux_sigmas(steps: int, image_seq_len: int) -> list[float]:
    """FLUX.1's inference sigmas: linear 1 → 1/steps, shifted by mu(seq len) (FlowMatchEulerDiscreteScheduler's
    dynamic shifting with FLUX's config), then 0."""
    base_len, max_len, base_shift, max_shift = 256, 4096, 0.5, 1.15
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)
    linear = np.linspace(1.0, 1.0 / steps, steps)
    return [float(math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))) for s in linear] + [0.0]


def load_vae(model: dict[str, Any]) -> Any:
    """The model's VAE alone (a latent-cache worker has no bundle)."""
    if model.get("preset"):
        from fluxtune.flux.model import build_preset

        return build_preset(model["preset"], seed=model.get("seed", 0), parts=("vae",)).vae
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model["path"], subfolder="vae", local_files_only=True)


@dataclass
class SampleGrids:
    """A few fixed validation examples, inpainted by the current transformer at every evaluation."""

    vae: Any
    batch: dict[str, Any]  # EncodedSet.batch of the first MAX_EXAMPLES validation examples
    height: int
    width: int
    guidance: float
    deliver: Callable[[bytes], None]
    steps: int = 8
    seed: int = 0

    @classmethod
    def for_worker(cls, model: dict[str, Any], val: Any, deliver: Callable[[bytes], None],
                   count: int = MAX_EXAMPLES, **kwargs: Any) -> "SampleGrids":
        """From the worker's ValidationSet (or EncodedSet) and the experiment's `model` spec."""
        from fluxtune.flux.encoded import preview_batch

        batch = preview_batch(val, count)  # one image size, also with aspect-ratio buckets
        rows, cols = (int(v) + 1 for v in batch["img_ids"][:, 1:].max(dim=0).values)
        return cls(vae=load_vae(model).eval(), batch=batch, height=rows * 16, width=cols * 16,
                   guidance=model.get("guidance", 30.0), deliver=deliver, **kwargs)

    def predict_latents(self, transformer: Any) -> Any:
        import torch

        from fluxtune.flux.flow import predict_velocity

        cond = self.batch["cond"]
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(cond.shape[:2] + (64,), generator=generator).to(cond)
        sigmas = flux_sigmas(self.steps, cond.shape[1])
        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((x.shape[0],), sigma, device=x.device)
            x = x + (following - sigma) * predict_velocity(transformer, x, self.batch, t, self.guidance).to(x)
        return x

    def _decode(self, packed: Any) -> list[np.ndarray]:
        from fluxtune.flux.packing import unpack_latents, vae_decode

        pixels = vae_decode(self.vae, unpack_latents(packed.float().cpu(), self.height, self.width))
        return [_to_uint8(p) for p in pixels.clamp(-1, 1).float().cpu().numpy()]

    def _masks(self) -> list[np.ndarray]:
        from fluxtune.flux.packing import unpack_latents

        f = 8  # the inverse of pack_mask: 64 channels per latent cell are its 8x8 pixel block
        h, w = self.height // f, self.width // f
        blocks = unpack_latents(self.batch["cond"][..., 64:].float().cpu(), self.height, self.width)
        pixels = blocks.reshape(-1, f, f, h, w).permute(0, 3, 1, 4, 2).reshape(-1, 1, h * f, w * f)
        return [_to_uint8(m, signed=False) for m in pixels.numpy()]

    def render(self, transformer: Any) -> bytes:
        import torch

        model = getattr(transformer, "module", transformer)  # DDP/DeepSpeed wrappers hide .config
        was_training = model.training
        model.eval()  # no LoRA dropout in what we show
        try:
            with torch.no_grad():
                predictions = self._decode(self.predict_latents(model))
                sources = self._decode(self.batch["cond"][..., :64])
                targets = self._decode(self.batch["x0"])
        finally:
            model.train(was_training)
        rows = [list(r) for r in zip(sources, self._masks(), predictions, targets)]
        png = grid_png(rows)
        self.deliver(png)
        return png
