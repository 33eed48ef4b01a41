"""Transformer weights on disk, one tensor at a time: diffusers' safetensors layout, read and written streamed.

A 12 B transformer is 48 GB in fp32. `save_pretrained` and `save_file` want every tensor of a file in memory at
once; here a file's header is written from the shapes alone, then each tensor's bytes follow as they arrive,
so writing holds one tensor; reading reads one tensor's bytes at a time. The layout is
diffusers' own (`diffusion_pytorch_model.safetensors`, or numbered shards plus
`diffusion_pytorch_model.safetensors.index.json`), so `FluxTransformer2DModel.from_pretrained` loads the folder.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MAX_SHARD_BYTES = 10 * 2**30  # diffusers' default max_shard_size
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]  # (name, shape, dtype) in the order tensors arrive


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


def shard_plan(layout: Layout, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Layout]:
    """Consecutive runs of `layout`, each at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[Layout] = [[]]
    size = 0
    for entry in layout:
        entry_bytes = nbytes(entry[1], entry[2])
        if shards[-1] and size + entry_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry_bytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(shard: Layout) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard:
        end = offset + nbytes(shape, dtype)
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def save_streamed(folder: Path | str, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = MAX_SHARD_BYTES, digests: dict[str, str] | None = None) -> list[Path]:
    """Write `tensors` (arriving in `layout` order, with its shapes and dtypes) as diffusers' safetensors layout.

    Holds one tensor at a time. A tensor out of order, of another shape or dtype, or one missing, raises.
    `digests`, when given, receives each written file's sha256 (file name → hex), hashed from the bytes as they
    are written: a 48 GB checkpoint is never read back to be hashed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(layout, max_shard_bytes)
    names = shard_names(len(shards))
    arriving = iter(tensors)
    written: list[Path] = []
    for shard, file_name in zip(shards, names):
        path = folder / file_name
        digest = hashlib.sha256() if digests is not None else None
        with open(path, "wb") as handle:
            write = _hashing_writer(handle, digest)
            write(_header(shard))
            for name, shape, dtype in shard:
                got_name, tensor = next(arriving, (None, None))
                if got_name != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    got = "nothing" if got_name is None else f"{got_name} {tuple(tensor.shape)} {tensor.dtype}"
                    raise ValueError(f"writing {path}: expected {name} {tuple(shape)} {dtype}, got {got}")
                write(_raw_bytes(tensor))
        if digest is not None:
            digests[file_name] = digest.hexdigest()
        written.append(path)
    if next(arriving, None) is not None:
        raise ValueError(f"writing {folder}: more tensors arrived than the layout lists")
    if len(shards) > 1:
        weight_map = {name: file_name for shard, file_name in zip(shards, names) for name, _, _ in shard}
        total = sum(nbytes(shape, dtype) for _, shape, dtype in layout)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        (folder / INDEX_NAME).write_bytes(text)
        if digests is not None:
            digests[INDEX_NAME] = hashlib.sha256(text).hexdigest()
        written.append(folder / INDEX_NAME)
    return written


def _hashing_writer(handle: Any, digest: Any) -> Callable[[bytes | memoryview], None]:
    if digest is None:
        return handle.write

    def write(data: bytes | memoryview) -> None:
        digest.update(data)  # hashlib releases the GIL for large buffers
        handle.write(data)

    return write


def read_header(path: Path | str) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def weight_files(folder: Path | str) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it, for a diffusers model folder (single file or sharded)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file_name for name, file_name in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    return {name: single for name in read_header(single)[1]}


def read_streamed(folder: Path | str, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of a diffusers model folder, one at a time, as stored (dtype and all), on the CPU.

    Each tensor is read with plain file reads into its own buffer: nothing else of the file is mapped or kept, so
    reading a 48 GB checkpoint holds one tensor.
    """
    from_name = {code: dtype for dtype, code in _DTYPES.items()}
    files = weight_files(folder)
    headers: dict[Path, tuple[int, dict[str, dict]]] = {}
    for name in names:
        if name not in files:
            raise KeyError(f"{folder} has no tensor {name!r}")
        path = files[name]
        if path not in headers:
            headers[path] = read_header(path)
        data_start, header = headers[path]
        entry = header[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=from_name[entry["dtype"]])
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if len(target) != end - begin:
            raise ValueError(f"{path}: {name} holds {end - begin} bytes, its shape needs {len(target)}")
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            if handle.readinto(target) != len(target):
                raise ValueError(f"{path} is cut short inside {name}")
        yield name, tensor
