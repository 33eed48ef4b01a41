"""Built-in stages: `full` (every transformer parameter) and `lora` (frozen base + adapter, merged at the end).

Both declare the dtype they keep the transformer's weights in (`weights_dtype`); the cycle hands them the
module in it, and they say where their trained fp32 weights are (`ctx.trained_weights`) when it is not the
live module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import fluxtune
from fluxtune.api import AdapterSpec
from fluxtune.default_plugins.optim import TrainingParams, stage_weights_dtype, train_steps
from fluxtune.strategies.deepspeed import DeepSpeedParams


class FullParams(TrainingParams):
    strategy: Literal["auto", "deepspeed", "ddp"] = Field(
        "auto", description="auto: DeepSpeed ZeRO on GPUs, DDP on CPU (DeepSpeed start-up dominates tiny CPU runs)")
    deepspeed: DeepSpeedParams = DeepSpeedParams()

    def strategy_for(self, device_type: str) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "deepspeed" if device_type == "cuda" else "ddp"

    def precision_for(self, device_type: str) -> str:
        """Under DeepSpeed its own `bf16` switch decides."""
        if self.strategy_for(device_type) == "deepspeed":
            return "bf16" if self.deepspeed.bf16 else "fp32"
        return self.precision


class LoraParams(TrainingParams):
    adapter: AdapterSpec = AdapterSpec(type="lora")
    merge: bool = Field(True, description="fold the adapter into the base at the end of the stage")


class FullStage:
    """Stage 1: every transformer parameter trains."""

    def __init__(self, params: FullParams):
        self.params = params

    def weights_dtype(self, device_type: str) -> str:
        p = self.params
        return stage_weights_dtype("full", p.strategy_for(device_type), p.precision_for(device_type), device_type)

    def run(self, ctx: Any) -> dict[str, float]:
        if self.params.strategy_for(ctx.device.type) == "deepspeed":
            from fluxtune.strategies.deepspeed import train_with_deepspeed

            return train_with_deepspeed(ctx, self.params)
        model = ctx.transformer  # fp32 (bf16 only under autocast): the live module is its own exact copy
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
    """Stage 2: the base is frozen (bf16 when the stage runs bf16), only the fp32 adapter trains; exported, then
    merged into the base exactly: merged W = canonical fp32 W + fp32 delta."""

    def __init__(self, params: LoraParams):
        self.params = params

    def weights_dtype(self, device_type: str) -> str:
        return stage_weights_dtype("lora", "ddp", self.params.precision, device_type)

    def run(self, ctx: Any) -> dict[str, float]:
        model = ctx.transformer
        adapter = ctx.adapter(self.params.adapter)
        trainable = adapter.attach(model)
        for param in trainable:  # peft makes adapter weights in the base's dtype; they train in fp32
            param.data = param.data.float()
        model.train()
        if self.params.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        metrics = train_steps(ctx, ctx.distribute(model), trainable, self.params)
        metrics.update(ctx.evaluate())  # the adapter's own score, before merging
        if self.params.gradient_checkpointing:
            model.disable_gradient_checkpointing()
        if ctx.rank == 0:
            adapter.export(model, ctx.export_dir / "adapter")
        if not self.params.merge:
            ctx.trained_weights = ctx.weights  # the base did not train (the adapter stays attached)
            return metrics
        merge_adapter(ctx, adapter, model)
        return metrics


def merge_adapter(ctx: Any, adapter: Any, model: Any) -> None:
    """Fold the adapter into the base; the merged fp32 values become the stage's trained weights.

    An adapter that can hand over its deltas (`take_deltas`) is merged exactly and streamed: each merged weight
    is the canonical fp32 value plus the fp32 delta, then rounded to the live base's dtype. Any other adapter
    merges in place, on fp32 base weights restored from the canonical copy first.
    """
    from fluxtune.canonical import FP32, LiveWeights, MergedWeights, assign, weights_dtype

    base_dtype = weights_dtype(model)
    canonical = ctx.weights if ctx.weights is not None else LiveWeights(model)  # None: the live module's values
    if hasattr(adapter, "take_deltas"):
        deltas = adapter.take_deltas(model)  # the adapter layers are gone, the base untouched
        merged = MergedWeights(canonical, deltas)
        assign(model, merged, base_dtype, names=list(deltas))
        ctx.trained_weights = LiveWeights(model) if base_dtype == FP32 else merged
    else:
        if base_dtype != FP32:
            assign(model, canonical, FP32)
        ctx.transformer = model = adapter.merge(model)
        ctx.trained_weights = LiveWeights(model)
    model.requires_grad_(True)  # every parameter trains in the next full stage


@fluxtune.hookimpl
def register_stages(register):
    register("full", FullStage, params=FullParams, doc="train every transformer parameter")
    register("lora", LoraStage, params=LoraParams, doc="train a LoRA-style adapter on the frozen base, then merge")
