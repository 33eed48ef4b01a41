"""Turn checked rows into model-ready arrays, and split rows into train/validation.

Arrays follow the FLUX Fill convention: image and target float32 CHW in [-1, 1], mask float32 1xHxW with 1
where the model must inpaint. All three are resized and centre-cropped with the same geometry so pixels stay
aligned. numpy + Pillow only: this module is imported by Ray Data workers and by `fluxtune validate`.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps

from fluxtune.data.buckets import cover_crop_box, nearest_bucket
from fluxtune.storage import is_uri


# Masks saved as JPEG or resampled by an editor carry small per-channel differences; a real colour image does not.
MASK_CHANNEL_TOLERANCE = 8 / 255
# FLUX packs 8x VAE latents 2x2, so pixel sizes must be multiples of 16.
RESOLUTION_MULTIPLE = 16
# Mask pixels at or above this grey level are inpainted (FluxFillPipeline's mask processor binarises at 0.5).
DEFAULT_MASK_THRESHOLD = 0.5

def check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution <= 0 or resolution % RESOLUTION_MULTIPLE:
        raise ValueError(
            f"resolution must be a positive multiple of {RESOLUTION_MULTIPLE}, got {resolution!r}"
        )


def open_image(path: str) -> Image.Image:
    """Open a local path or a URI (URIs need fsspec, imported only when one is used)."""
    if path.startswith("file://"):
        return Image.open(path[len("file://"):])
    if is_uri(path):
        from fluxtune.storage import read_bytes

        return Image.open(io.BytesIO(read_bytes(path)))
    return Image.open(path)


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees: width and height swap


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the image: after its EXIF orientation (from the header)."""
    width, height = image.size
    try:
        turned = image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED
    except Exception:  # a malformed EXIF block: Pillow's viewers ignore it too
        turned = False
    return (height, width) if turned else (width, height)


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (phones store pictures sideways)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the pixels as stored, like a viewer that ignores it
        return image


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header only, as a viewer shows it (for a URI, the object is fetched)."""
    with open_image(path) as image:
        return oriented_size(image)


def _wide_as_unit(image: Image.Image) -> np.ndarray | None:
    """A 16-bit, 32-bit integer or float single-channel image as float32 in [0, 1]; None for other modes.

    Pillow's own convert("L"/"RGB") clips these at 255, so a 16-bit PNG would turn all white.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode not in ("I", "F"):
        return None
    # 32-bit modes carry no range: 16-bit PNGs may open as "I", hand-made arrays as 0..1 or 0..255.
    values = np.asarray(image, dtype=np.float32)
    top = float(values.max(initial=0.0))
    scale = 1.0 if mode == "F" and top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    return np.clip(values / scale, 0.0, 1.0)


def as_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB image of what the file shows (16-bit grey scaled, not clipped)."""
    image = upright(image)
    unit = _wide_as_unit(image)
    if unit is not None:
        image = Image.fromarray(np.round(unit * 255.0).astype(np.uint8))
    return image.convert("RGB")


def _alpha_hole(mask: Image.Image) -> np.ndarray | None:
    """A mask drawn in transparency only (uniform colour, varying alpha): 1 where transparent, the hole, as in
    image editors' and OpenAI's edit masks. None when the colour varies or alpha does not."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode not in ("RGBA", "LA", "La", "RGBa", "PA"):
        return None
    bands = np.asarray(mask.convert("RGBA"), dtype=np.float32) / 255.0
    colour, alpha = bands[..., :3], bands[..., 3]
    colour_varies = float(np.ptp(colour, axis=(0, 1)).max(initial=0.0)) > MASK_CHANNEL_TOLERANCE
    if colour_varies or float(np.ptp(alpha)) <= MASK_CHANNEL_TOLERANCE:
        return None
    return 1.0 - alpha


def mask_as_gray(mask: Image.Image) -> np.ndarray:
    """A mask image as float32 HxW in [0, 1] (1 = inpaint), read as its author meant it:

    - white = inpaint in grey or colour images whose channels agree (a colour image is refused: averaging red
      and green into "half inpaint" would silently train on the wrong region);
    - a mask of only 0 and 1 (a label map saved as an 8- or 16-bit image) is 0/1, not "almost black";
    - 16-bit and float masks are scaled to their range;
    - a mask whose colour is uniform and whose alpha varies marks the hole by transparency;
    - EXIF orientation is applied, as for the image and the target.
    """
    mask = upright(mask)
    hole = _alpha_hole(mask)
    if hole is not None:
        return hole
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.float32)
    unit = _wide_as_unit(mask)
    if unit is not None:
        raw = np.asarray(mask)
        if mask.mode != "F" and int(raw.max(initial=0)) == 1:  # a 0/1 label map
            return raw.astype(np.float32)
        return unit
    if mask.mode in ("L", "LA", "La"):
        raw = np.asarray(mask.getchannel(0))
        return raw.astype(np.float32) if int(raw.max(initial=0)) == 1 else raw.astype(np.float32) / 255.0
    raw = np.asarray(mask.convert("RGB"))
    rgb = raw.astype(np.float32) / 255.0
    spread = float((rgb.max(axis=2) - rgb.min(axis=2)).max(initial=0.0))
    if spread > MASK_CHANNEL_TOLERANCE:
        raise ValueError(
            f"mask is a colour image (channels differ by up to {round(spread * 255)}/255); "
            "save it as grayscale: white = inpaint, black = keep"
        )
    if int(raw.max(initial=0)) == 1:  # a 0/1 label map saved in colour or a palette
        return raw.astype(np.float32).mean(axis=2)
    return rgb.mean(axis=2)


def _centre_square(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred square crop box: resizing it equals "resize the shorter side, then centre-crop"."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _crop(size: tuple[int, int], resolution: int, bucket: tuple[int, int] | None
          ) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """(output size, source box): the centre square at resolution², or the bucket's cover-and-centre-crop."""
    if bucket is None:
        return (resolution, resolution), _centre_square(size)
    return bucket, cover_crop_box(size, bucket)


def _rgb_chw(image: Image.Image, resolution: int, bucket: tuple[int, int] | None = None) -> np.ndarray:
    image = as_rgb(image)
    out_size, box = _crop(image.size, resolution, bucket)
    resized = image.resize(out_size, Image.Resampling.BICUBIC, box=box)
    pixels = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def binary_mask(mask: Image.Image, resolution: int, threshold: float,
                bucket: tuple[int, int] | None = None) -> np.ndarray:
    """The mask as trained: grey (see `mask_as_gray`), cropped like the image, binarised; float32 1xHxW."""
    gray = Image.fromarray(mask_as_gray(mask))  # float "F" image, so resampling keeps full precision
    out_size, box = _crop(gray.size, resolution, bucket)
    resized = gray.resize(out_size, Image.Resampling.BILINEAR, box=box)
    return (np.asarray(resized, dtype=np.float32) >= threshold).astype(np.float32)[None]


def check_mask_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask_threshold must be between 0 and 1 (exclusive), got {threshold!r}")


def load_triplet(image_path: str, mask_path: str, target_path: str, resolution: int,
                 mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                 buckets: Sequence[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Load one (image, mask, target) triple of paths; see `load_example`. With `buckets` (sizes from
    `fluxtune.data.buckets`), the triple is cropped to the bucket nearest the image's aspect ratio."""
    check_resolution(resolution)
    check_mask_threshold(mask_threshold)
    with open_image(image_path) as image, open_image(mask_path) as mask, open_image(target_path) as target:
        bucket = nearest_bucket(oriented_size(image), buckets) if buckets else None
        return {
            "image": _rgb_chw(image, resolution, bucket),
            "mask": binary_mask(mask, resolution, mask_threshold, bucket),
            "target": _rgb_chw(target, resolution, bucket),
        }


class ImagePaths(Protocol):
    """What `load_example` reads of a row (a `fluxtune.data.rows.Row`, which imports this module)."""

    image: str
    mask: str
    output: str


def load_example(row: ImagePaths, resolution: int, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                 buckets: Sequence[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """One row as arrays: image/target float32 3xRxR in [-1, 1], mask float32 1xRxR in {0, 1} (HxW of its
    bucket with `buckets`)."""
    return load_triplet(row.image, row.mask, row.output, resolution, mask_threshold, buckets)


def stack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Per-row arrays as one array: stacked when they share a shape, else a 1-D object array of them (what Ray
    Data turns into a variable-shaped tensor column)."""
    if len({a.shape for a in arrays}) <= 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = list(arrays)
    return ragged


def load_examples_batch(batch: Mapping[str, Any], resolution: int,
                        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                        buckets: Sequence[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """`map_batches(..., batch_format="numpy")` function: path columns image/mask/output → stacked arrays.

    Returns image (N,3,R,R), mask (N,1,R,R), target (N,3,R,R). Other columns (prompt, line, …) pass through
    unchanged so later steps can still use them. With `buckets`, rows of different buckets come back as object
    arrays of per-row arrays (see `stack_rows`), with each row's bucket in `height` and `width` columns.
    """
    examples = [
        load_triplet(str(image), str(mask), str(output), resolution, mask_threshold, buckets)
        for image, mask, output in zip(batch["image"], batch["mask"], batch["output"], strict=True)
    ]
    count = len(examples)
    stacked = {
        name: stack_rows([example[name] for example in examples])
        if examples
        else np.zeros((0, channels, resolution, resolution), dtype=np.float32)
        for name, channels in (("image", 3), ("mask", 1), ("target", 3))
    }
    if buckets:
        stacked["height"] = np.array([e["target"].shape[1] for e in examples], dtype=np.int64)
        stacked["width"] = np.array([e["target"].shape[2] for e in examples], dtype=np.int64)
    passed_through = {key: np.asarray(value) for key, value in batch.items() if key not in ("image", "mask", "output")}
    for key, value in passed_through.items():
        if len(value) != count:
            raise ValueError(f"column {key!r} has {len(value)} values, expected {count}")
    return {**passed_through, **stacked}


def split_is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """Whether `key` belongs to the validation split.

    Hash-based, so it is the same in every process and Python run (built-in hash() is salted per process), and an
    example keeps its side when rows are added or reordered. Use a key that survives moving the dataset, e.g. the
    path relative to the JSONL folder.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def split_key(resolved_path: str, jsonl_folder: str) -> str:
    """The key an example is split by: its target path relative to the JSONL folder (URIs as they are)."""
    if is_uri(resolved_path):
        return resolved_path
    return os.path.relpath(resolved_path, jsonl_folder)
