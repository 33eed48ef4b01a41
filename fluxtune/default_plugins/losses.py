"""Built-in losses on the flow-matching velocity."""

from __future__ import annotations

from typing import Any

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class FlowMatchingParams(Params):
    mask_weight: float = Field(0.0, ge=0.0, description="extra weight on tokens inside the inpainting mask")


class FlowMatchingLoss:
    """Mean squared error between predicted and true velocity, optionally up-weighting the masked region."""

    def __init__(self, params: FlowMatchingParams):
        self.mask_weight = params.mask_weight

    def __call__(self, pred: Any, target: Any, batch: dict[str, Any]) -> Any:
        per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, seq]
        if self.mask_weight:
            # A token is "masked" when any of its 256 packed mask pixels is set.
            in_mask = batch["mask"].amax(dim=-1)
            weights = 1.0 + self.mask_weight * in_mask
            return (per_token * weights).sum() / weights.sum()
        return per_token.mean()


@fluxtune.hookimpl
def register_losses(register):
    register("flow_matching", FlowMatchingLoss, params=FlowMatchingParams,
             doc="MSE on the flow-matching velocity (noise - x0), optional masked-region weight")
