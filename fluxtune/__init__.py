"""fluxtune: plugin-based Ray Tune experiments for fine-tuning FLUX.1-Fill-dev.

The public API for plugin authors lives here; it imports nothing heavy (no torch, ray or diffusers).
Helpers for testing a plugin are in `fluxtune.testing` (that one does import torch and diffusers).
"""

import logging

import pluggy

from fluxtune.api import (
    Adapter,
    AdapterSpec,
    Callback,
    CallbackSpec,
    ComponentSpec,
    Loss,
    LossSpec,
    Params,
    Stage,
    StageContext,
    TimestepSampler,
    TimestepSamplerSpec,
)

__version__ = "0.1.0"

# bitsandbytes (the `adamw8bit` optimizer; peft imports it whenever it is installed) warns at import on AVX-512
# CPUs that an optional 4-bit kernel cannot be fetched from a hub. fluxtune has no 4-bit layers: keep it out of logs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Marks a plugin's hook implementations (`@fluxtune.hookimpl def register_stages(register): ...`).
hookimpl = pluggy.HookimplMarker("fluxtune")

__all__ = [
    "Adapter",
    "AdapterSpec",
    "Callback",
    "CallbackSpec",
    "ComponentSpec",
    "Loss",
    "LossSpec",
    "Params",
    "Stage",
    "StageContext",
    "TimestepSampler",
    "TimestepSamplerSpec",
    "__version__",
    "hookimpl",
]
