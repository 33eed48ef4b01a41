"""Aspect-ratio buckets: a few training sizes of about `resolution²` pixels, each row trained at the one nearest
its own aspect ratio (resized to cover it, then centre-cropped), so wide and tall images keep their content.

Pure arithmetic (no Pillow, torch or ray): the config schema, `fluxtune data check` and Ray Data tasks use it.
Sizes are (width, height) in pixels, like Pillow's `Image.size`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

# FLUX packs 8x VAE latents 2x2: every side is a multiple of 16 (as `fluxtune.data.images.RESOLUTION_MULTIPLE`).
SIDE_MULTIPLE = 16
# `buckets: auto` goes up to 2:1 (and 1:2): wider crops leave too few tokens on the short side at 512².
AUTO_MAX_RATIO = 2.0
# An explicit bucket's area may differ from resolution² by this much: memory and the timestep shift follow it.
AREA_TOLERANCE = 0.25

Size = tuple[int, int]


def auto_buckets(resolution: int, max_ratio: float = AUTO_MAX_RATIO) -> list[Size]:
    """Sizes of about resolution² pixels from 1:max_ratio to max_ratio:1, sides multiples of 16, sorted by
    aspect ratio (tall first). The square resolution×resolution is always one of them. Widths step by
    resolution/16 (64 px at 1024²), so a dataset is not spread over dozens of nearly equal buckets."""
    area = resolution * resolution
    step = max(SIDE_MULTIPLE, resolution // 16 // SIDE_MULTIPLE * SIDE_MULTIPLE)
    sizes = set()
    for width in range(resolution, int(resolution * max_ratio * 1.5) + 1, step):
        height = max(SIDE_MULTIPLE, round(area / width / SIDE_MULTIPLE) * SIDE_MULTIPLE)
        if width / height > max_ratio:
            break
        sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def check_buckets(buckets: Sequence[Sequence[int]], resolution: int) -> list[Size]:
    """Explicit [[w, h], ...] as sizes; ValueError naming the first bad one (side not a multiple of 16, area far
    from resolution², duplicates)."""
    sizes: list[Size] = []
    area = resolution * resolution
    for i, bucket in enumerate(buckets):
        if len(bucket) != 2 or not all(isinstance(v, int) and v > 0 for v in bucket):
            raise ValueError(f"bucket {i} must be [width, height] in pixels, got {list(bucket)!r}")
        width, height = bucket
        if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
            raise ValueError(f"bucket {i} [{width}, {height}]: sides must be multiples of {SIDE_MULTIPLE}")
        if abs(width * height / area - 1) > AREA_TOLERANCE:
            raise ValueError(f"bucket {i} [{width}, {height}] has {width * height} pixels, more than "
                             f"{AREA_TOLERANCE:.0%} away from resolution² = {area}")
        if (width, height) in sizes:
            raise ValueError(f"bucket {i} [{width}, {height}] is listed twice")
        sizes.append((width, height))
    if not sizes:
        raise ValueError("buckets must list at least one [width, height]")
    return sizes


def resolve_buckets(buckets: str | Sequence[Sequence[int]] | None, resolution: int) -> list[Size] | None:
    """The `data.buckets` setting as sizes: None (off: one centre-square crop), "auto", or an explicit list."""
    if buckets is None:
        return None
    if buckets == "auto":
        return auto_buckets(resolution)
    if isinstance(buckets, str):
        raise ValueError(f"buckets must be 'auto' or a list of [width, height], got {buckets!r}")
    return check_buckets(buckets, resolution)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are equally far from
    1:1); ties go to the earlier bucket, so the choice is the same everywhere."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} has no aspect ratio")
    ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def cover_crop_box(size: Size, bucket: Size) -> tuple[float, float, float, float]:
    """The centred box of the image with the bucket's aspect ratio: resizing it to the bucket equals "resize to
    cover the bucket, then centre-crop". For a square bucket this is the centre square."""
    width, height = size
    scale = min(width / bucket[0], height / bucket[1])  # image pixels per bucket pixel, covering both sides
    crop_w, crop_h = bucket[0] * scale, bucket[1] * scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def bucket_histogram(sizes: Iterable[Size], buckets: Sequence[Size]) -> dict[Size, int]:
    """Rows per bucket, every bucket listed (empty ones with 0), in the buckets' order."""
    counts = Counter(nearest_bucket(size, buckets) for size in sizes)
    return {bucket: counts.get(bucket, 0) for bucket in buckets}


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"
