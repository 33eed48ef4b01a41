"""The validation preview: a few fixed held-out examples inpainted by the current transformer, once per evaluation
that asks for it, then both scored inside their masks (`masked_psnr`, `masked_ssim`) and drawn as a grid people look
at in MLflow (source | mask | prediction | target: the masked source the model sees, the mask, its inpainting, the
target).

One sampling serves both: fixed examples, noise and steps, so the same weights always give the same numbers and
the same picture. Every panel is a VAE decode of the encoded examples, so it works with the latent cache (no pixels,
no text encoders in the worker); the targets are the VAE's own reconstruction, the best the model can give back.
Panels are capped at PANEL_MAX px and rows at MAX_EXAMPLES so a report stays small even for 1024² data; small
ones are enlarged to PANEL_MIN px so a person can see them. No mlflow here: this runs inside Ray workers; the PNG
rides to the driver with the next report.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch

from fluxtune.flux.inpaint import masked_psnr, masked_ssim
from fluxtune.flux.sampling import (decode_to_uint8, load_scheduler, load_vae, sample_fill_latents,
                                    unpack_pixel_mask)

MAX_EXAMPLES = 4
PANEL_MAX = 256  # px; a grid is at most 4 × 256 wide
PANEL_MIN = 96  # px; smaller images are enlarged (whole pixels, no smoothing) so the labels and details read
COLUMNS = ("source", "mask", "prediction", "target")
LABEL_HEIGHT = 20  # px of the header row naming the columns


class ValidationPreview:
    """Fixed validation examples, inpainted at an evaluation: scores returned, grid handed to `deliver`."""

    def __init__(self, vae: Any, scheduler: Any, val: Any, deliver: Callable[[bytes, int | None], None] | None = None,
                 examples: int = MAX_EXAMPLES, steps: int = 8, guidance: float = 30.0, seed: int = 0):
        from fluxtune.flux.encoded import preview_batch

        self.batch = preview_batch(val, examples)  # one image size, also with aspect-ratio buckets
        self.vae, self.scheduler, self.steps, self.guidance = vae, scheduler, steps, guidance
        self.deliver = deliver  # (PNG, its step; None: the step of the report it rides with); None: no grid
        self.noise = torch.randn(self.batch["x0"].shape, generator=torch.Generator().manual_seed(seed)).to(
            self.batch["x0"])
        rows, cols = (int(v) + 1 for v in self.batch["img_ids"][:, 1:].max(dim=0).values)
        self.height, self.width = rows * 16, cols * 16
        pixel_masks = unpack_pixel_mask(self.batch["mask"], self.height, self.width)[:, 0].float().cpu().numpy()
        self.masks = pixel_masks > 0.5
        self.mask_panels = [np.repeat((np.clip(m, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)
                            for m in pixel_masks]
        self.targets = decode_to_uint8(vae, self.batch["x0"], self.height, self.width)
        self.sources = decode_to_uint8(vae, self.batch["cond"][..., :64], self.height, self.width) if deliver else None

    @classmethod
    def for_worker(cls, model: dict[str, Any], val: Any, deliver: Callable[[bytes, int | None], None] | None = None,
                   **kwargs: Any) -> "ValidationPreview":
        """From the worker's ValidationSet (or EncodedSet) and the experiment's `model` spec."""
        return cls(load_vae(model), load_scheduler(model), val, deliver, guidance=model.get("guidance", 30.0),
                   **kwargs)

    def predictions(self, transformer: Any) -> np.ndarray:
        """The examples inpainted by `transformer` (dropout off): [B, H, W, 3] uint8."""
        model = getattr(transformer, "module", transformer)  # DDP/DeepSpeed wrappers hide .config
        was_training = model.training
        model.eval()
        try:
            latents = sample_fill_latents(model, self.scheduler, self.batch, self.noise, self.steps, self.guidance)
        finally:
            model.train(was_training)
        return decode_to_uint8(self.vae, latents, self.height, self.width)

    def __call__(self, transformer: Any, step: int | None = None) -> dict[str, float]:
        """Sample once: deliver the grid (for `step`, else for the next report) and return the masked scores."""
        results = self.predictions(transformer)
        if self.deliver is not None:
            rows = [list(r) for r in zip(self.sources, self.mask_panels, results, self.targets)]
            self.deliver(grid_png(rows), step)
        scored = [(r, t, m) for r, t, m in zip(results, self.targets, self.masks) if m.any()]  # empty: nothing to score
        if not scored:
            return {}
        return {"masked_psnr": float(np.mean([masked_psnr(*example) for example in scored])),
                "masked_ssim": float(np.mean([masked_ssim(*example) for example in scored]))}


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
