"""Planning a stage: its peak memory per worker and its FLOPs per step, from the transformer config alone (no torch).

Parameter and LoRA counts are exact (every Linear of FluxTransformer2DModel is listed from the config; tests compare
with built models). Memory follows the dtype policy the stages implement, per strategy and device, and the order in
which a training step holds tensors: static state (weights, optimizer states, gradient buffers), then activations
during forward, gradients replacing activations block by block during backward, then the optimizer step with its
temporaries; the plan is the highest of those moments. Activation bytes per token are measured per block type at
real width (`benchmarks/plan_accuracy.py`, figures in BENCHMARKS.md). What it cannot size (a plugin's stage,
adapter or optimizer) it reports as unknown rather than guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxtune.flux import presets
from fluxtune.plan.inventory import (  # noqa: F401  (the planner's public names)
    Linear, layer_tokens, linear_layers, lora_parameter_count, parameter_count, targeted,
)
from fluxtune.plan.flops import training_flops  # noqa: F401
from fluxtune.plan.memory import OPTIMIZER_STATE_BYTES, GiB, activation_bytes_per_token  # noqa: F401
from fluxtune.plan.stages import RESERVE_GIB, StagePlan, full_stage_memory, lora_stage_memory  # noqa: F401

PEAK_BF16_FLOPS = 989e12  # dense bf16 of one H100/H200 SXM: the denominator of MFU
DEFAULT_TEXT_TOKENS = presets.FLUX_TEXT_TOKENS

KNOWN_OPTIMIZERS = (*OPTIMIZER_STATE_BYTES, "adafactor")


@dataclass(frozen=True)
class Workload:
    """What one worker processes per micro-batch."""

    resolution: int
    batch: int  # micro-batch per worker
    text_tokens: int

    @property
    def image_tokens(self) -> int:
        return (self.resolution // 16) ** 2


def plan_stages(experiment: dict[str, Any], config: dict[str, Any], gpus: int,
                text_tokens: int = DEFAULT_TEXT_TOKENS, device: str = "cuda") -> list[StagePlan]:
    """One StagePlan per stage of `experiment` (a normalised experiment dict) on `gpus` workers of `device`."""
    work = Workload(experiment["data"]["resolution"], experiment["data"]["batch_size"], text_tokens)
    return [plan_stage(stage, config, gpus, work, device) for stage in experiment["stages"]]


def plan_stage(stage: dict[str, Any], config: dict[str, Any], gpus: int, work: Workload, device: str) -> StagePlan:

    adapter = stage.get("adapter") or {}
    optimizer = (stage.get("optimizer") or {}).get("type", "adamw")
    lora = stage["type"] == "lora"
    if stage["type"] not in ("full", "lora") or (lora and adapter.get("type", "lora") != "lora"):
        what = f"adapter {adapter['type']!r}" if lora else f"plugin stage type {stage['type']!r}"
        return StagePlan(stage["name"], stage["type"], f"{what}: the planner cannot size it", unknown=what)
    flops = training_flops(config, work.image_tokens, work.text_tokens, work.batch,
                           targets=(adapter.get("targets") or _default_targets()) if lora else None,
                           rank=int(adapter.get("rank", 64)) if lora else 0)
    if optimizer not in KNOWN_OPTIMIZERS:
        what = f"optimizer {optimizer!r}"
        return StagePlan(stage["name"], stage["type"], f"{what}: the planner cannot size its states", unknown=what,
                         flops=flops)
    plan = (lora_stage_memory if lora else full_stage_memory)(stage, config, gpus, work, device)
    plan.flops = flops
    return plan


def mfu(flops_per_step: float, seconds_per_step: float, peak: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the chip's dense bf16 peak."""
    return flops_per_step / seconds_per_step / peak


def _default_targets() -> list[str]:
    from fluxtune.default_plugins.adapters import DEFAULT_TARGETS

    return list(DEFAULT_TARGETS)


def transformer_config(model: dict[str, Any]) -> tuple[dict[str, Any], str, int]:
    """(config, label, text tokens) of the experiment's model, read without loading any weights."""
    import json
    import os

    if model.get("preset"):
        spec = presets.preset(model["preset"])
        return spec.transformer, f"preset {spec.name}", spec.t5_max_length
    path = os.path.join(model["path"], "transformer", "config.json")
    with open(path) as file:
        return json.load(file), model["path"], DEFAULT_TEXT_TOKENS
