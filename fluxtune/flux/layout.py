"""What a FLUX.1-Fill model folder must look like, checked from its JSON configs alone (no torch, no weights).

The CLI's preflight and `load_flux` both use it, so a wrong folder fails before Ray starts and before any
weights are read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

FILL_IN_CHANNELS = 384  # 64 noisy + 64 masked-image + 256 mask, packed 2x2
FILL_OUT_CHANNELS = 64


def check_fill_layout(config: Mapping[str, Any], where: str = "transformer config") -> None:
    """Raise ValueError unless `config` is a FLUX Fill transformer (patch 1, 384 channels in, 64 out).

    A text-to-image FLUX (in_channels 64) would load fine and then fail deep inside the first step.
    """
    patch_size = config.get("patch_size")
    in_channels = config.get("in_channels")
    out_channels = config.get("out_channels") or in_channels  # diffusers: out_channels None means in_channels
    if (patch_size, in_channels, out_channels) != (1, FILL_IN_CHANNELS, FILL_OUT_CHANNELS):
        raise ValueError(
            f"{where} is not a FLUX.1-Fill transformer: expected patch_size 1, in_channels {FILL_IN_CHANNELS}, "
            f"out_channels {FILL_OUT_CHANNELS}; got patch_size {patch_size}, in_channels {in_channels}, "
            f"out_channels {out_channels}"
        )


def fill_transformer_config(path: str | os.PathLike) -> dict[str, Any]:
    """The transformer config of a local diffusers FLUX.1-Fill folder; ValueError says what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model folder {path} does not exist" if not os.path.exists(path)
                         else f"{path} is a file, expected a diffusers FLUX.1-Fill folder")
    config_path = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a diffusers FLUX folder: {config_path} not found")
    try:
        with open(config_path) as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    check_fill_layout(config, where=f"{path}/transformer")
    if not os.path.isdir(os.path.join(path, "vae")):
        raise ValueError(f"{path} has no vae/ folder")
    return config
