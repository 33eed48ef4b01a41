"""fluxtune: plugin-based Ray Tune experiments for fine-tuning FLUX.1-Fill-dev.

The public API for plugin authors lives here; it imports nothing heavy (no torch, ray or diffusers).
"""

import pluggy

from fluxtune.api import (
    Adapter,
    AdapterSpec,
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

hookimpl = pluggy.HookimplMarker("fluxtune")

__all__ = [
    "Adapter",
    "AdapterSpec",
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
