"""A generated inpainting dataset small enough for tests and simple enough for a tiny model to learn.

Each example is an R x R scene (R a multiple of 16, at least 32) on a grid of 8 x 8 cells of c = R/8 pixels:

* background: per channel a linear gradient m + gx * (2x/(R-1) - 1) + gy * (2y/(R-1) - 1), with m in [80, 175]
  and gx, gy in [-30, 30], so every background channel stays within [20, 235];
* one "key" disc of a pure palette colour (red, green, blue, yellow, magenta or cyan: every channel 0 or 255, so
  it never matches the background), radius 0.75c to 1.05c, always more than c/2 pixels clear of the hole;
* the hole (the mask, white = inpaint): a rectangle aligned to the cell grid, 2 or 3 cells on each side.

The rule a model must learn, and that `tests/test_sample_data.py` reproduces from the files alone:
**inside the hole, the target continues the background gradient (a plane fitted to the visible pixels around
the hole) and shows a square in the key disc's colour, side s = min(h, w) // 2, top-left corner at
(y0 + (h - s) // 2, x0 + (w - s) // 2).** The source image is the target with the hole blanked to grey (128);
outside the hole source and target are identical. Every 8th row carries a prompt naming the square's colour.

Examples depend only on (seed, index, resolution), so the first k examples are the same for any n. Bump
GENERATOR_VERSION whenever the output changes: it keys the cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1
JSONL_NAME = "data.jsonl"
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
HOLE_FILL = 128
PROMPT_EVERY = 8


def write_sample_dataset(out_dir: str | os.PathLike, n: int = 64, resolution: int = 64, seed: int = 0) -> Path:
    """Write n examples (PNGs under images/) and data.jsonl with relative paths; returns the JSONL path."""
    _check_arguments(n, resolution, seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        source, mask, target, colour_name = make_example(index, resolution, seed)
        stem = f"images/{index:04d}"
        for suffix, pixels in (("", source), ("_mask", mask), ("_target", target)):
            Image.fromarray(pixels).save(out / f"{stem}{suffix}.png")
        row: dict = {"user_input": {"image": f"{stem}.png", "mask": f"{stem}_mask.png"}, "output": f"{stem}_target.png"}
        if index % PROMPT_EVERY == 0:
            row["prompt"] = f"fill the hole with a {colour_name} square"
        lines.append(json.dumps(row))
    jsonl = out / JSONL_NAME
    jsonl.write_text("\n".join(lines) + "\n")  # written last: its presence means the images are complete
    return jsonl


def ensure_sample_dataset(
    n: int = 64, resolution: int = 64, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The JSONL path of a cached sample dataset, generating it on first use.

    Generation happens in a temporary sibling folder that is renamed into place, so a crash or a concurrent
    writer never leaves a half-written folder under the final name.
    """
    _check_arguments(n, resolution, seed)
    folder = sample_cache_root(cache_dir) / f"v{GENERATOR_VERSION}-n{n}-r{resolution}-s{seed}"
    jsonl = folder / JSONL_NAME
    if jsonl.is_file():
        return jsonl
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write_sample_dataset(staging, n=n, resolution=resolution, seed=seed)
        try:
            os.rename(staging, folder)
        except OSError:
            if not jsonl.is_file():  # not a lost race with another writer: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return jsonl


def sample_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where sample datasets are cached: cache_dir, else $FLUXTUNE_CACHE, else ~/.cache/fluxtune."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("FLUXTUNE_CACHE"):
        root = Path(os.environ["FLUXTUNE_CACHE"])
    else:
        root = Path.home() / ".cache" / "fluxtune"
    return root / "sample"


def make_example(index: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One example as uint8 arrays (source RxRx3, mask RxR, target RxRx3) and the key colour's name."""
    rng = np.random.default_rng([seed, index])
    cell = resolution // 8
    hole_h, hole_w = (int(v) * cell for v in rng.integers(2, 4, size=2))
    y0 = int(rng.integers(0, 8 - hole_h // cell + 1)) * cell
    x0 = int(rng.integers(0, 8 - hole_w // cell + 1)) * cell
    mean = rng.uniform(80, 175, size=3)
    slope_x, slope_y = rng.uniform(-30, 30, size=(2, 3))
    colour_name = str(rng.choice(list(PALETTE)))
    radius = rng.uniform(0.75, 1.05) * cell

    ys, xs = np.mgrid[0:resolution, 0:resolution].astype(np.float64)
    u, v = 2 * xs / (resolution - 1) - 1, 2 * ys / (resolution - 1) - 1
    scene = mean + slope_x * u[..., None] + slope_y * v[..., None]

    centre_y, centre_x = _disc_centre(rng, resolution, radius, (y0, x0, hole_h, hole_w), margin=cell / 2)
    scene[(ys - centre_y) ** 2 + (xs - centre_x) ** 2 <= radius**2] = PALETTE[colour_name]
    side = min(hole_h, hole_w) // 2
    top, left = y0 + (hole_h - side) // 2, x0 + (hole_w - side) // 2
    scene[top : top + side, left : left + side] = PALETTE[colour_name]

    target = np.rint(scene).astype(np.uint8)
    source = target.copy()
    source[y0 : y0 + hole_h, x0 : x0 + hole_w] = HOLE_FILL
    mask = np.zeros((resolution, resolution), dtype=np.uint8)
    mask[y0 : y0 + hole_h, x0 : x0 + hole_w] = 255
    return source, mask, target, colour_name


def _disc_centre(
    rng: np.random.Generator, resolution: int, radius: float, hole: tuple[int, int, int, int], margin: float
) -> tuple[int, int]:
    """A random integer centre keeping the disc inside the image and more than `margin` pixels from the hole."""
    y0, x0, height, width = hole
    ys, xs = np.mgrid[0:resolution, 0:resolution]
    inside = (ys - radius >= 0) & (xs - radius >= 0) & (ys + radius <= resolution - 1) & (xs + radius <= resolution - 1)
    clear = (
        (xs + radius < x0 - margin)
        | (xs - radius > x0 + width - 1 + margin)
        | (ys + radius < y0 - margin)
        | (ys - radius > y0 + height - 1 + margin)
    )
    candidates = np.argwhere(inside & clear)
    if len(candidates) == 0:  # the geometry above always leaves a free strip of 2.5 cells; this is a bug guard
        raise RuntimeError(f"no room for the key disc (resolution {resolution}, hole {hole})")
    centre_y, centre_x = candidates[rng.integers(len(candidates))]
    return int(centre_y), int(centre_x)


def _check_arguments(n: int, resolution: int, seed: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(resolution, int) or resolution < 32 or resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 and at least 32, got {resolution!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
