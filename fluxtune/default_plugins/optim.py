"""Parameter models and the optimisation loop shared by the built-in stages: optimizer, learning-rate schedule,
gradient accumulation, clipping, precision, and which dtype a stage keeps its weights in."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field

from fluxtune.api import ComponentSpec, Params

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")


class OptimizerSpec(ComponentSpec):
    """`optimizer: {type: adamw, lr: …}`: a registered optimizer and its settings (`type` defaults to adamw)."""

    kind: ClassVar[str] = "optimizer"
    type: str = "adamw"

    def settings(self) -> dict[str, Any]:
        return {"type": self.type, **self.params()}


class TrainingParams(Params):
    """What every built-in stage shares: optimiser, schedule, accumulation, clipping, precision, memory switches."""

    optimizer: OptimizerSpec = OptimizerSpec()
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "constant", description="learning-rate schedule over the stage's updates (diffusers' names and curves; "
                                "constant ignores warmup_steps)")
    warmup_steps: int = Field(0, ge=0, description="updates of linear warm-up from 0 (all but constant)")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="micro-batches per optimizer update; `steps` counts updates")
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU (bf16 is slower than fp32 on CPU); "
                            "a DeepSpeed stage follows deepspeed.bf16")
    gradient_checkpointing: bool = False


def runs_bf16(precision: str, device_type: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def stage_weights_dtype(stage_type: str, strategy: str, precision: str, device_type: str) -> str:
    """The dtype ("bf16" or "fp32") a built-in stage keeps its transformer's weights in.

    DeepSpeed full stage in bf16: a bf16 module (the engine keeps fp32 masters). DDP full stage: fp32 weights,
    bf16 autocast when it runs bf16. LoRA: the frozen base in bf16 when the stage runs bf16, else fp32 (the
    adapter itself is always fp32).
    """
    bf16 = runs_bf16(precision, device_type)
    if stage_type == "full":
        return "bf16" if strategy == "deepspeed" and bf16 else "fp32"
    return "bf16" if bf16 else "fp32"


def autocast(ctx: Any, precision: str):
    import torch

    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16,
                          enabled=runs_bf16(precision, ctx.device.type))


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at update `step` (0-based), as diffusers' schedules define it."""

    def warmed(step: int) -> float | None:
        return step / max(1, warmup_steps) if step < warmup_steps else None

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        warming = warmed(step)
        if warming is not None:
            return warming
        if schedule == "constant_with_warmup":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine, half a period

    return factor


def lr_schedule(optimizer: Any, params: TrainingParams, total_steps: int) -> Any:
    """A LambdaLR stepped once per optimizer update (not per micro-batch)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(params.lr_scheduler, params.warmup_steps, total_steps))


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def train_steps(ctx: Any, module: Any, trainable: list[Any], params: TrainingParams) -> dict[str, float]:
    """Run `ctx.steps` optimizer updates of `module` (maybe DDP-wrapped) over `trainable` parameters.

    Each update takes `gradient_accumulation_steps` micro-batches: their gradients add up (each loss divided by
    their count, so the update is the mean's), DDP synchronises only on the last one, clipping sees the sum, and
    the logged loss is the update's mean.
    """
    import torch

    optimizer = ctx.optimizer(trainable, **params.optimizer.settings())
    scheduler = lr_schedule(optimizer, params, ctx.steps)
    micro_batches = params.gradient_accumulation_steps
    batches = ctx.batches()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(ctx.steps):
        total = torch.zeros((), device=ctx.device)
        for micro in range(micro_batches):
            last = micro == micro_batches - 1
            with module.no_sync() if not last and hasattr(module, "no_sync") else nullcontext():
                with autocast(ctx, params.precision):
                    loss = ctx.training_loss(module, next(batches))
                (loss / micro_batches).backward()
            total += loss.detach().float()
        if params.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        lr = current_lr(optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.log(step, {"loss": total / micro_batches, "lr": lr})
        ctx.maybe_evaluate(step + 1)
    elapsed = time.perf_counter() - started
    # CPU seconds per update (whole process): comparable across runs on a shared machine, where wall time is not.
    return {"steps_per_s": ctx.steps / elapsed if elapsed > 0 else 0.0,
            "step_cpu_s": (time.process_time() - cpu_started) / ctx.steps}
