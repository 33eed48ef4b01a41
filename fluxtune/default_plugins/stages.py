"""Built-in stages: `full` (every transformer parameter) and `lora` (frozen base + adapter, merged at the end)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import fluxtune
from fluxtune.api import AdapterSpec
from fluxtune.default_plugins.optim import TrainingParams, train_steps
from fluxtune.strategies.deepspeed import DeepSpeedParams


class FullParams(TrainingParams):
    strategy: Literal["auto", "deepspeed", "ddp"] = Field(
        "auto", description="auto: DeepSpeed ZeRO on GPUs, DDP on CPU (DeepSpeed start-up dominates tiny CPU runs)")
    deepspeed: DeepSpeedParams = DeepSpeedParams()

    def strategy_for(self, device_type: str) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "deepspeed" if device_type == "cuda" else "ddp"


class LoraParams(TrainingParams):
    adapter: AdapterSpec = AdapterSpec(type="lora")
    merge: bool = Field(True, description="fold the adapter into the base at the end of the stage")


class FullStage:
    """Stage 1: every transformer parameter trains."""

    def __init__(self, params: FullParams):
        self.params = params

    def run(self, ctx: Any) -> dict[str, float]:
        if self.params.strategy_for(ctx.device.type) == "deepspeed":
            from fluxtune.strategies.deepspeed import train_with_deepspeed

            metrics, ctx.transformer = train_with_deepspeed(ctx, self.params)
            return metrics
        model = ctx.transformer
        model.requires_grad_(True)
        model.train()
        if self.params.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        trainable = [p for p in model.parameters() if p.requires_grad]
        metrics = train_steps(ctx, ctx.distribute(model), trainable, self.params)
        if self.params.gradient_checkpointing:
            model.disable_gradient_checkpointing()
        return metrics


class LoraStage:
    """Stage 2: the base is frozen, only the adapter trains; exported, then merged into the base."""

    def __init__(self, params: LoraParams):
        self.params = params

    def run(self, ctx: Any) -> dict[str, float]:
        model = ctx.transformer
        adapter = ctx.adapter(self.params.adapter)
        trainable = adapter.attach(model)
        model.train()
        if self.params.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        metrics = train_steps(ctx, ctx.distribute(model), trainable, self.params)
        metrics.update(ctx.evaluate())  # the adapter's own score, before merging
        if self.params.gradient_checkpointing:
            model.disable_gradient_checkpointing()
        if ctx.rank == 0:
            adapter.export(model, ctx.export_dir / "adapter")
        if self.params.merge:
            ctx.transformer = adapter.merge(model)
        return metrics


@fluxtune.hookimpl
def register_stages(register):
    register("full", FullStage, params=FullParams, doc="train every transformer parameter")
    register("lora", LoraStage, params=LoraParams, doc="train a LoRA-style adapter on the frozen base, then merge")
