"""Starting from a registered version: its base transformer with its adapter merged in.

No mlflow here (this runs in Ray workers): the driver has already downloaded the version's checkpoint folder
(`fluxtune.tracking.registry.resolve_registered_model`); this only reads it, safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def registered_transformer(checkpoint: str | Path, transformer: Any) -> Any:
    """`transformer` (the base the YAML names) replaced by the version's saved base if it has one, with the
    version's LoRA adapter fused in; every parameter trainable again, ready for the first stage."""
    folder = Path(checkpoint)
    if not (folder / "model.json").exists():
        raise FileNotFoundError(f"{folder} is not a registered fluxtune checkpoint (no model.json)")
    if (folder / "base").is_dir():
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(folder / "base").to(transformer.device)
    if (folder / "adapter").is_dir():
        # The file carries the adapter's alpha as metadata (without it alpha would reload as the rank).
        transformer.load_lora_adapter(str(folder / "adapter"), prefix="transformer", use_safetensors=True)
        transformer.fuse_lora()
        transformer.unload_lora()
    transformer.requires_grad_(True)  # peft leaves fused weights frozen
    return transformer.train()
