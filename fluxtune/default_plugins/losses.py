"""Built-in losses on the flow-matching velocity."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class FlowMatchingParams(Params):
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="per-sample weight w(t) (SD3 paper; diffusers' compute_loss_weighting_for_sd3)")
    mask_weight: float = Field(0.0, ge=0.0, description="extra weight on tokens inside the inpainting mask")


def time_weights(t: Any, scheme: str) -> Any:
    """w(t) per sample, t = σ in [0, 1] (1 = noise). `none` is 1; the others are the SD3 schemes."""
    import torch

    t = t.float()
    if scheme == "sigma_sqrt":
        return t.clamp_min(1e-3) ** -2.0  # clamped: t → 0 would give one sample unbounded weight
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    return torch.ones_like(t)


class FlowMatchingLoss:
    """Mean squared error between predicted and true velocity; optional w(t) and masked-region up-weighting."""

    def __init__(self, params: FlowMatchingParams):
        self.weighting = params.weighting
        self.mask_weight = params.mask_weight

    def __call__(self, pred: Any, target: Any, batch: dict[str, Any]) -> Any:
        per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, seq]
        weights = per_token.new_ones(per_token.shape)
        if self.mask_weight:
            # A token is "masked" when any of its 256 packed mask pixels is set.
            weights = weights + self.mask_weight * batch["mask"].amax(dim=-1).float()
        per_sample = (per_token * weights).sum(dim=1) / weights.sum(dim=1)
        if self.weighting != "none":
            per_sample = per_sample * time_weights(batch["t"], self.weighting).to(per_sample)
        return per_sample.mean()


@fluxtune.hookimpl
def register_losses(register):
    register("flow_matching", FlowMatchingLoss, params=FlowMatchingParams,
             doc="MSE on the flow-matching velocity (noise - x0); w(t) none/sigma_sqrt/cosmap; masked-region weight")
