"""Stage `ema`: train every transformer parameter, then keep the exponential moving average of the weights.

An EMA "refinement" stage smooths the last steps' noise out of the weights (the EMA is usually a better
model than the final iterate). Uses only fluxtune's public API: the stage context gives the model, batches,
loss, optimizer, data-parallel wrapping and reporting.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import fluxtune

__version__ = "0.1.0"


class Optimizer(fluxtune.Params):
    lr: float = Field(1.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class EmaParams(fluxtune.Params):
    optimizer: Optimizer = Optimizer()
    decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay per step (0: plain last weights)")
    start: int = Field(0, ge=0, description="steps before the average starts following the weights")
    max_grad_norm: float | None = Field(1.0, gt=0)


def ema_update(average: list[Any], weights: list[Any], decay: float) -> None:
    """average ← decay · average + (1 − decay) · weights, in place, for lists of tensors."""
    import torch

    with torch.no_grad():
        torch._foreach_lerp_(average, [w.detach() for w in weights], 1.0 - decay)


class EmaStage:
    def __init__(self, params: EmaParams):
        self.params = params

    def run(self, ctx: fluxtune.StageContext) -> dict[str, float]:
        import torch

        p = self.params
        model = ctx.transformer
        model.requires_grad_(True)
        model.train()
        weights = list(model.parameters())
        average = [w.detach().clone() for w in weights]
        optimizer = ctx.optimizer(weights, lr=p.optimizer.lr, weight_decay=p.optimizer.weight_decay)
        trained = ctx.distribute(model)
        batches = ctx.batches()
        for step in range(ctx.steps):
            loss = ctx.training_loss(trained, next(batches))
            loss.backward()
            if p.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(weights, p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Before `start` the average simply tracks the weights (decay 0), so early noise is not kept.
            ema_update(average, weights, p.decay if step >= p.start else 0.0)
            ctx.log(step, {"loss": loss.detach()})
            ctx.maybe_evaluate(step + 1)  # evaluates the live weights; the stage end scores the average
        with torch.no_grad():
            for w, a in zip(weights, average):
                w.copy_(a)
        return {"ema_decay": p.decay}


@fluxtune.hookimpl
def register_stages(register):
    register("ema", EmaStage, params=EmaParams, doc="full fine-tune, ending on the EMA of the weights")
