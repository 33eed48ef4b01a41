"""Sample-image grids: what the model paints at each evaluation, so people look instead of read.

A header row names the columns, then one row per validation example: source (what the model sees: the masked
source) | mask | prediction | target.
Rendered in the worker (rank 0) from the *encoded* validation examples the evaluation already uses, so it works
with the latent cache too (no pixels, no text encoders in the worker): the prediction is a short flow-matching
Euler sampling with FLUX's shifted sigmas, exactly the transformer inputs FluxFillPipeline builds
(fluxtune.flux.flow), and every panel is a VAE decode (the mask is unpacked exactly from its 256 channels).

The PNG rides to the driver with the next Tune report, like the buffered step metrics, and the driver's MLflow
callback logs it: no shared filesystem is assumed. Panels are capped at PANEL_MAX px and rows at MAX_EXAMPLES so
a report stays small even for 1024² data; small ones are enlarged to PANEL_MIN px so a person can see them.
A trial that starts from scratch also draws its starting weights at step 0, so the image slider (which opens at
step 0) shows a grid, and the "before" picture is there to compare with. No mlflow import here: this module runs
inside Ray workers.
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
PANEL_MIN = 96  # px; smaller images are enlarged (whole pixels, no smoothing) so the labels and details read
COLUMNS = ("source", "mask", "prediction", "target")
LABEL_HEIGHT = 20  # px of the header row naming the columns
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


def panel_size(height: int, width: int, panel_max: int = PANEL_MAX, panel_min: int = PANEL_MIN) -> tuple[int, int]:
    """(width, height) of each panel: shrunk to fit panel_max, or enlarged by a whole factor to reach panel_min."""
    longest = max(height, width)
    scale = panel_max / longest if longest > panel_max else float(max(1, -(-panel_min // longest)))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_png(rows: list[list[np.ndarray]], labels: tuple[str, ...] = COLUMNS, panel_max: int = PANEL_MAX,
             panel_min: int = PANEL_MIN) -> bytes:
    """HWC uint8 panels, one list per row → one PNG: a header row naming the columns, then every panel at the
    same size (see `panel_size`)."""
    from PIL import Image, ImageDraw, ImageFont

    size = panel_size(*rows[0][0].shape[:2], panel_max=panel_max, panel_min=panel_min)
    columns = max(len(r) for r in rows)
    top = LABEL_HEIGHT if labels else 0
    canvas = Image.new("RGB", (columns * size[0], top + len(rows) * size[1]), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for x, label in enumerate(labels[:columns]):
        width = draw.textlength(label, font=font)
        draw.text((x * size[0] + max(0.0, (size[0] - width) / 2), 3), label, fill="white", font=font)
    for y, row in enumerate(rows):
        for x, panel in enumerate(row):
            canvas.paste(Image.fromarray(panel).resize(size, Image.NEAREST), (x * size[0], top + y * size[1]))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_samples(samples: list[bytes | tuple[int | None, bytes]]) -> str:
    """Grids for a report: PNG bytes, or (step, PNG) for a grid of another step than the report's."""
    pairs = [s if isinstance(s, tuple) else (None, s) for s in samples]
    return json.dumps([{"step": step, "png": base64.b64encode(png).decode("ascii")} for step, png in pairs])


def decode_samples(value: str | None) -> list[tuple[int | None, bytes]]:
    """(step or None for the report's own step, PNG bytes) of each grid a report carries."""
    return [(item["step"], base64.b64decode(item["png"])) for item in json.loads(value or "[]")]


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
    deliver: Callable[[bytes, int | None], None]  # (PNG, its step; None: the step of the report it rides with)
    steps: int = 8
    seed: int = 0

    @classmethod
    def for_worker(cls, model: dict[str, Any], val: Any, deliver: Callable[[bytes, int | None], None],
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

    def render(self, transformer: Any, step: int | None = None) -> bytes:
        """Inpaint the examples with `transformer` and deliver the grid; `step` when it is not the step of the
        next report (the starting weights, drawn before the first training step)."""
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
        self.deliver(png, step)
        return png
