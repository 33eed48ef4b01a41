"""Parameter models and the optimisation loop shared by the built-in stages."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from fluxtune.api import Params


class OptimizerParams(Params):
    lr: float = Field(1.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1.0e-8, gt=0)


class TrainingParams(Params):
    """What every built-in stage shares: optimiser, clipping, precision, memory switches."""

    optimizer: OptimizerParams = OptimizerParams()
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU (bf16 is slower than fp32 on CPU)")
    gradient_checkpointing: bool = False


def autocast(ctx: Any, precision: str):
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and ctx.device.type == "cuda")
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_steps(ctx: Any, module: Any, trainable: list[Any], params: TrainingParams) -> dict[str, float]:
    """Run `ctx.steps` optimisation steps of `module` (maybe DDP-wrapped) over `trainable` parameters."""
    import torch

    optimizer = ctx.optimizer(trainable, **params.optimizer.model_dump())
    batches = ctx.batches()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(ctx.steps):
        batch = next(batches)
        with autocast(ctx, params.precision):
            loss = ctx.training_loss(module, batch)
        loss.backward()
        if params.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.log(step, {"loss": loss.detach()})
        ctx.maybe_evaluate(step + 1)
    elapsed = time.perf_counter() - started
    # CPU seconds per step (whole process): comparable across runs on a shared machine, where wall time is not.
    return {"steps_per_s": ctx.steps / elapsed if elapsed > 0 else 0.0,
            "step_cpu_s": (time.process_time() - cpu_started) / ctx.steps}
