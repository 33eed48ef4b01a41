"""The canonical fp32 weights of the transformer between stages, and the live module made from them.

A stage may keep its live module in bf16 (a DeepSpeed engine's module, a LoRA stage's frozen base). The fp32
values that a full stage's optimizer starts from and that a LoRA delta is added to then live elsewhere:

- `LiveWeights`: the live module itself, when it is fp32 (the CPU path: nothing is copied or read);
- `SavedWeights`: the last stage checkpoint, which *is* the canonical copy (rank 0 reads it tensor by tensor
  and broadcasts each tensor to the other ranks, so no worker holds a second copy of the model);
- `MergedWeights`: another source plus a LoRA stage's fp32 deltas;
- a DeepSpeed engine's fp32 master weights (`fluxtune.strategies.deepspeed.EngineMasters`).

Invariant between stages: the live module holds the canonical values rounded to its own dtype. Every source
yields fp32 tensors on the worker's device in the module's `state_dict` order; reading one is a collective
(every rank iterates the same names in the same order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = {"fp32": FP32, "bf16": BF16}


def plain_name(name: str) -> str | None:
    """A state-dict name with peft's wrapping taken off (`….to_q.base_layer.weight` → `….to_q.weight`); None for
    the adapter's own tensors."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def plain_state(module: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors of `module` (adapter tensors left out) by their plain names, without copying."""
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        plain = plain_name(name)
        if plain is not None:
            out[plain] = tensor
    return out


def weights_dtype(module: Any) -> torch.dtype:
    """The one floating dtype of the base model's tensors (adapter tensors may differ)."""
    dtypes = {t.dtype for t in plain_state(module).values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"the transformer's weights mix dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


class Weights:
    """A source of the canonical fp32 tensors. `tensors(names)` is a collective on every rank."""

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the source holds (a DeepSpeed engine); called once it has been written."""


class LiveWeights(Weights):
    """The live module's own values: exact when it is fp32; a module whose canonical values are its bf16 ones
    (a preset built in bf16, before its first checkpoint) is read upcast."""

    def __init__(self, module: Any):
        self.module = module

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        state = plain_state(self.module)
        for name in state if names is None else names:
            tensor = state[name].detach()
            yield name, tensor.to(FP32) if tensor.is_floating_point() else tensor


class SavedWeights(Weights):
    """A diffusers model folder on rank 0 (the last stage checkpoint, or the model being fine-tuned), read one
    tensor at a time and broadcast from rank 0; other ranks only know the shapes (from their own module)."""

    def __init__(self, folder: Path | None, shapes: dict[str, torch.Size], device: torch.device, rank: int = 0,
                 world_size: int = 1):
        if rank == 0 and folder is None:
            raise ValueError("rank 0 needs the folder of the canonical weights")
        self.folder, self.shapes, self.device = folder, shapes, device
        self.rank, self.world_size = rank, world_size

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        import torch.distributed as dist

        from fluxtune.flux.weights import read_streamed

        names = list(self.shapes if names is None else names)
        stored = read_streamed(self.folder, names) if self.rank == 0 else None
        for name in names:
            if stored is not None:
                _, tensor = next(stored)
                tensor = tensor.to(device=self.device, dtype=FP32)
                if tuple(tensor.shape) != tuple(self.shapes[name]):
                    raise ValueError(f"{self.folder}: {name} has shape {tuple(tensor.shape)}, the model "
                                     f"{tuple(self.shapes[name])}")
            else:
                tensor = torch.empty(self.shapes[name], dtype=FP32, device=self.device)
            if self.world_size > 1:
                dist.broadcast(tensor, src=0)
            yield name, tensor


class MergedWeights(Weights):
    """`base` with fp32 deltas added (a merged LoRA): W + delta, both fp32, computed when a tensor is read."""

    def __init__(self, base: Weights, deltas: dict[str, Callable[[], torch.Tensor]]):
        self.base, self.deltas = base, deltas

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.base.tensors(names):
            delta = self.deltas.get(name)
            yield name, (tensor + delta().to(tensor.device, FP32)) if delta is not None else tensor


def cast(module: Any, dtype: torch.dtype, device: Any = None) -> Any:
    """`module.to(device, dtype)` without diffusers' override, which warns on every dtype cast even for a model
    that keeps no module in fp32 (FLUX keeps none)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def assign(module: Any, weights: Weights, dtype: torch.dtype, names: Iterable[str] | None = None) -> None:
    """Set the module's tensors (all, or `names`) to the canonical values rounded to `dtype`, one at a time."""
    state = plain_state(module)
    with torch.no_grad():
        for name, value in weights.tensors(names if names is not None else list(state)):
            target = state[name]
            target.data = value.to(device=target.device, dtype=dtype if target.is_floating_point() else target.dtype)


def layout(module: Any) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """What a checkpoint of the module's canonical weights holds: plain names, shapes, fp32."""
    return [(name, tuple(t.shape), FP32 if t.is_floating_point() else t.dtype)
            for name, t in plain_state(module).items()]


def shapes(module: Any) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in plain_state(module).items()}


def save_weights_folder(folder: Path, module: Any, tensors: Iterable[tuple[str, torch.Tensor]],
                        digests: dict[str, str] | None = None) -> None:
    """A diffusers model folder (config.json + safetensors) of `module`'s architecture holding `tensors`, the
    canonical values in `layout(module)` order, streamed: `from_pretrained(folder)` loads it. `digests`: see
    `fluxtune.flux.weights.save_streamed` (the weight files' sha256, taken while writing)."""
    from fluxtune.flux.weights import save_streamed

    model = getattr(module, "module", module)  # DDP/DeepSpeed wrappers hide .config
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_streamed(folder, layout(model), tensors, digests=digests)
