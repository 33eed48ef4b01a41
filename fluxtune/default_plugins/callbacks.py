"""Built-in runtime callbacks (`base.callbacks: [{type: nan_guard}]`)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class NanGuardParams(Params):
    every: int = Field(10, ge=1, description="check every N steps (each check syncs the device once)")
    max_loss: float | None = Field(None, gt=0, description="also stop when the loss exceeds this")


class NanGuard:
    """Stop a diverging trial early with a clear error instead of training on NaNs until the stage ends."""

    def __init__(self, params: NanGuardParams):
        self.params = params

    def on_step_end(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        if (step + 1) % self.params.every or "loss" not in metrics:
            return
        loss = float(metrics["loss"])
        too_big = self.params.max_loss is not None and loss > self.params.max_loss
        if not math.isfinite(loss) or too_big:
            raise FloatingPointError(f"stage {ctx.name!r} cycle {ctx.cycle} step {step + 1}: loss {loss} "
                                     f"{'is not finite' if not too_big else f'exceeds max_loss {self.params.max_loss}'}"
                                     " (nan_guard)")


@fluxtune.hookimpl
def register_callbacks(register):
    register("nan_guard", NanGuard, params=NanGuardParams,
             doc="stop the trial when the training loss turns NaN/inf (or exceeds max_loss)")
