"""Loss `masked_l1`: L1 on the flow-matching velocity, weighted by where the inpainting mask is.

Inpainting only has to get the masked region right; the unmasked region is given by the masked image. This
loss puts `inside` weight on tokens the mask touches and `outside` weight on the rest, with an optional MSE
term (`mse`) for the smooth gradients near zero error that L1 lacks.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

import fluxtune

__version__ = "0.1.0"


class MaskedL1Params(fluxtune.Params):
    inside: float = Field(1.0, ge=0.0, description="weight of tokens inside the mask")
    outside: float = Field(0.1, ge=0.0, description="weight of tokens outside the mask")
    mse: float = Field(0.0, ge=0.0, description="weight of an added (equally masked) squared-error term")

    @model_validator(mode="after")
    def _some_weight(self) -> "MaskedL1Params":
        if self.inside == 0 and self.outside == 0:
            raise ValueError("inside and outside are both 0: the loss would ignore every token")
        return self


class MaskedL1:
    def __init__(self, params: MaskedL1Params):
        self.params = params

    def __call__(self, pred: Any, target: Any, batch: dict[str, Any]) -> Any:
        error = pred.float() - target.float()  # [B, seq, 64] packed velocity
        per_token = error.abs().mean(dim=-1)
        if self.params.mse:
            per_token = per_token + self.params.mse * error.pow(2).mean(dim=-1)
        # batch["mask"] is the packed mask [B, seq, 256]: a token is inside when any of its pixels is masked.
        inside = batch["mask"].amax(dim=-1).to(per_token.dtype)
        weights = self.params.outside + (self.params.inside - self.params.outside) * inside
        return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


@fluxtune.hookimpl
def register_losses(register):
    register("masked_l1", MaskedL1, params=MaskedL1Params,
             doc="L1 on the velocity, weighted inside/outside the inpainting mask (+ optional MSE)")
