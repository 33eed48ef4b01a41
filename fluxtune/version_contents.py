"""What a registered version is made of, and loading it: a small adapter plus a *reference* to the base
transformer it was trained on (never a copy: the real base is ≈48 GB in fp32).

`model.json` in the version's checkpoint artifact:
  {"model": {preset | path, seed, guidance, …},      what `fluxtune.worker_setup.load_bundle` builds
   "base": reference or null,                         where the base transformer is, with content hashes
   "fused": ["fused/0", …]}                           adapters merged into that base first, in order
References:
  {"checkpoint": "<folder or s3://…>", "files": {"transformer/…": sha256}}   a stage checkpoint of the sweep
  {"model_path": "/models/FLUX.1-Fill-dev", "files": {"transformer/…": sha256}}   the configured model itself
  null                                                the preset, rebuilt from its seed
Versions registered before references existed carry a copied `base/` folder; they still load.

No mlflow here (this runs in Ray workers and in the pyfunc model); safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtune import storage
from fluxtune.checkpoints import HASH, WEIGHTS, file_hash

MODEL_JSON = "model.json"
ADAPTER = "exports/adapter"  # where an adapter stage's export lives inside its checkpoint


@dataclass(frozen=True)
class StageCheckpoint:
    stage: str
    cycle: int
    global_step: int
    checkpoint: str
    has_weights: bool = True  # False once the sweep pruned its transformer (not needed any more)
    has_adapter: bool = False  # the stage exported an adapter (a LoRA-type stage)


@dataclass(frozen=True)
class Release:
    """The stage checkpoints a version is made of: the trial's last stage, on the transformer it was trained on."""

    trial: str
    final: StageCheckpoint
    base: StageCheckpoint | None  # whose transformer is the base; None: the model the experiment names

    @property
    def adapter(self) -> StageCheckpoint | None:
        return self.final if self.final.has_adapter else None

    @property
    def weights(self) -> list[str]:
        """The checkpoint whose transformer weights registering it needs (the adapter is an export: never pruned)."""
        return [self.base.checkpoint] if self.base is not None else []


def release_of(trial: str, stages: list[StageCheckpoint]) -> Release | None:
    """A version of the trial's finished `stages` (in order): its last adapter on the stage before it, or its last
    full stage alone; None without a finished stage."""
    if not stages:
        return None
    final = stages[-1]
    if not final.has_adapter:  # a full-type last stage: its transformer is the whole model
        return Release(trial, final, final)
    return Release(trial, final, stages[-2] if len(stages) > 1 else None)


class RegisteredBaseError(RuntimeError):
    """The base transformer a registered version references is gone or has changed (one line)."""


def checkpoint_reference(checkpoint: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A stage checkpoint's transformer, by location and the hashes its writer recorded."""
    files = {name: entry[HASH] for name, entry in manifest["files"].items()
             if name.startswith(WEIGHTS + "/") and isinstance(entry, dict) and HASH in entry}
    return {"checkpoint": str(checkpoint), "files": files}


def model_path_reference(model_path: str) -> dict[str, Any]:
    """The configured model's transformer (`<path>/transformer`), hashed now (reads every byte once)."""
    folder = Path(model_path) / WEIGHTS
    files = {f"{WEIGHTS}/{p.relative_to(folder)}": file_hash(str(p)) for p in sorted(folder.rglob("*"))
             if p.is_file()}
    return {"model_path": str(model_path), "files": files}


def describe(reference: dict[str, Any] | None, model: dict[str, Any]) -> str:
    if reference is None:
        return f"preset {model.get('preset')!r} (seed {model.get('seed', 0)}), rebuilt when loaded"
    where = reference.get("checkpoint") or reference.get("model_path")
    return f"{where} ({len(reference['files'])} files, {HASH} recorded)"


def check_reference(reference: dict[str, Any] | None, verify: bool = True) -> None:
    """Raise RegisteredBaseError when a referenced file is missing or (with `verify`) hashes differently."""
    if reference is None:
        return
    root = reference.get("checkpoint") or reference["model_path"]
    for name, expected in reference["files"].items():
        path = storage.join(root, name)
        if not storage.exists(path):
            raise RegisteredBaseError(f"the base transformer of this registered version is gone: {path} no longer "
                                      "exists (its sweep folder was deleted or moved)")
        if verify and file_hash(path) != expected:
            raise RegisteredBaseError(f"the base transformer of this registered version has changed: {path} does "
                                      f"not match the {HASH} recorded at registration")


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_JSON
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a registered fluxtune checkpoint (no {MODEL_JSON})")
    return json.loads(path.read_text())


def registered_base(folder: str | Path, transformer: Any, verify: bool = True) -> Any:
    """The version's base: `transformer` (built from the version's `model`) or the referenced checkpoint's,
    checked against its hashes, with the version's `fused` adapters merged in. Not the version's own adapter."""
    folder = Path(folder)
    meta = read_meta(folder)
    reference = meta.get("base")
    if (folder / "base").is_dir():  # a version registered with a copied base
        transformer = _from_pretrained(folder / "base", transformer)
    elif reference is not None:
        check_reference(reference, verify)
        if reference.get("checkpoint"):
            with storage.local_copy(storage.join(reference["checkpoint"], WEIGHTS)) as local:
                transformer = _from_pretrained(local, transformer)
    for adapter in meta.get("fused", []):
        transformer = _fuse(transformer, folder / adapter)
    return transformer


def registered_transformer(checkpoint: str | Path, transformer: Any, verify: bool = False) -> Any:
    """A new search starting from a registered version: its base with its adapter merged in, every parameter
    trainable again. The driver already checked the reference (`verify` repeats the hash in each worker)."""
    folder = Path(checkpoint)
    transformer = registered_base(folder, transformer, verify)
    if (folder / "adapter").is_dir():
        transformer = _fuse(transformer, folder / "adapter")
    transformer.requires_grad_(True)  # peft leaves fused weights frozen
    return transformer.train()


def _from_pretrained(folder: Path | str, like: Any) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(os.fspath(folder)).to(like.device)


def _fuse(transformer: Any, adapter: Path) -> Any:
    # The file carries the adapter's alpha as metadata (without it alpha would reload as the rank).
    transformer.load_lora_adapter(str(adapter), prefix="transformer", use_safetensors=True)
    transformer.fuse_lora()
    transformer.unload_lora()
    return transformer
