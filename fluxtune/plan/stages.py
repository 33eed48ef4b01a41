"""The built-in stages' memory per worker: `full` (DDP or DeepSpeed ZeRO) and `lora`, by device and dtype policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxtune.plan.inventory import Linear, linear_layers, lora_parameter_count, parameter_count, targeted
from fluxtune.plan.memory import DTYPE_BYTES, GiB, Step, adapter_activations, optimizer_state_bytes

RESERVE_GIB = 2.0  # CUDA context, allocator fragmentation, NCCL buffers


@dataclass
class StagePlan:
    name: str
    kind: str  # "full", "lora" or the plugin's stage type
    detail: str
    parts: dict[str, float] = field(default_factory=dict)  # GiB per worker; what the peak moment holds
    peak_gib: float | None = None  # None: unknown
    moment: str = ""  # which moment of the step is the peak ("backward", "optimizer step")
    offloaded_gib: float = 0.0  # optimizer state held in CPU memory instead (per worker)
    unknown: str | None = None  # why the planner cannot size this stage
    flops: float | None = None  # per worker and optimizer step (model FLOPs: no recomputation)

    @property
    def total(self) -> float:
        return self.peak_gib if self.peak_gib is not None else float("nan")

    def fits(self, gpu_mem_gib: float) -> bool | None:
        return None if self.peak_gib is None else self.peak_gib + RESERVE_GIB <= gpu_mem_gib


DS_REDUCE_BUCKET = 50_000_000  # DeepSpeedParams.reduce_bucket_size's default (elements)


def _optimizer(stage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    params = dict(stage.get("optimizer") or {})
    return params.pop("type", "adamw"), params


def _accumulation(stage: dict[str, Any]) -> int:
    return int(stage.get("gradient_accumulation_steps", 1) or 1)


def _compute_dtype(stage: dict[str, Any], device: str) -> str:
    """The stages' `precision`: auto is bf16 autocast on GPU, fp32 on CPU."""
    precision = stage.get("precision", "auto")
    return "bfloat16" if precision == "bf16" or (precision == "auto" and device == "cuda") else "float32"


def _step_temporary(optimizer: str, device: str, largest: float) -> float:
    """An optimizer step's own temporaries: torch's fused AdamW (the GPU default) and bitsandbytes' blockwise 8-bit
    AdamW none; AdamW's single-tensor loop (CPU), Prodigy and Adafactor about two fp32 temporaries of the largest
    tensor they update (AdamW: sqrt(v), then its division). Under DeepSpeed that tensor is the whole flat partition."""
    if optimizer == "adamw8bit" or (optimizer == "adamw" and device == "cuda"):
        return 0.0
    return 8.0 * largest


def full_stage_memory(stage: dict[str, Any], config: dict[str, Any], gpus: int, work: Any, device: str):
    step, detail = full_stage_step(stage, config, gpus, work, device)
    return _finish(StagePlan(stage["name"], "full", detail), step)


def full_stage_step(stage: dict[str, Any], config: dict[str, Any], gpus: int, work: Any,
                    device: str) -> tuple[Step, str]:
    """The full stage's step (static state, activations, gradients per part) and a one-line description."""
    strategy = stage.get("strategy", "auto")
    if strategy == "auto":
        strategy = "deepspeed" if device == "cuda" else "ddp"
    checkpointing = bool(stage.get("gradient_checkpointing", False))
    optimizer, optimizer_params = _optimizer(stage)
    layers = linear_layers(config)
    params = parameter_count(config)
    largest = max(layer.inputs * layer.outputs for layer in layers)
    step = Step(config, {"image": work.image_tokens, "text": work.text_tokens}, work.batch, device)
    if strategy == "deepspeed":
        # ZeRO hands the optimizer one flat 1-D partition: Adafactor cannot factor it (a full second moment)
        states = optimizer_state_bytes(optimizer, [], params, optimizer_params, flat=True)
        ds = stage.get("deepspeed") or {}
        zero, bf16, offload = int(ds.get("zero_stage", 2)), bool(ds.get("bf16", True)), bool(
            ds.get("offload_optimizer", False))
        width = 2 if bf16 else 4
        dtype = "bfloat16" if bf16 else "float32"
        bucket = int(ds.get("reduce_bucket_size", DS_REDUCE_BUCKET))
        shard = params / gpus
        step.static["weights"] = params * width / (gpus if zero >= 3 else 1)
        optimizer_bytes = states / gpus + (4 * shard if bf16 else 0)  # + fp32 master weights
        if offload:
            step.offloaded = optimizer_bytes
        else:
            step.static["optimizer"] = optimizer_bytes
        # Backward collects bf16 gradients in a reduce bucket, each rank keeping its partition's share. The step
        # flattens that partition, casts it to fp32 and frees the bf16 copies, then runs the optimizer over it.
        partition = (shard if zero >= 2 else params) * width
        step.backward_buffers["gradient buffers"] = partition + bucket * width
        if zero >= 3:  # ZeRO-3 gathers each block's weights for its forward and backward (and prefetches the next)
            step.backward_buffers["gathered weights"] = 2 * max(step.segment_params().values()) * width
        fp32_gradients = 4 * shard
        if not offload:
            step.moments["gradients to fp32"] = {"gradient buffers": 2 * partition, "fp32 gradients": fp32_gradients}
            step.moments["optimizer step"] = {"fp32 gradients": fp32_gradients,
                                              "step temporaries": _step_temporary(optimizer, device, shard)}
        detail = (f"DeepSpeed ZeRO-{zero}{' bf16' if bf16 else ''}{' + optimizer offload' if offload else ''}"
                  + (" (ZeRO-1/3: approximate)" if zero != 2 else ""))
    else:
        states = optimizer_state_bytes(optimizer, layers, params, optimizer_params)
        dtype = _compute_dtype(stage, device)
        step.static["weights"] = 4.0 * params
        step.static["optimizer"] = states
        if gpus > 1:
            step.static["gradient buffers"] = 4.0 * params  # DDP's bucket copy of every gradient
        for segment, count in step.segment_params().items():
            step.gradients[segment] = 4.0 * count
        if dtype == "bfloat16":  # autocast keeps a bf16 copy of each Linear weight for backward
            for layer in layers:
                step.activations[_segment(layer)] += 2.0 * layer.inputs * layer.outputs
        step.moments["optimizer step"] = {"gradients": 4.0 * params,
                                          "step temporaries": _step_temporary(optimizer, device, largest)}
        if _accumulation(stage) > 1:
            step.held_gradients = 4.0 * params
        detail = f"DDP, fp32 weights{' (bf16 autocast)' if dtype == 'bfloat16' else ''}"
    step.add_block_activations("trained", dtype, checkpointing)
    step.add_outer_activations(True, dtype)
    return step, _describe(detail, stage, optimizer, checkpointing)


def lora_stage_memory(stage: dict[str, Any], config: dict[str, Any], gpus: int, work: Any, device: str):
    step, detail = lora_stage_step(stage, config, gpus, work, device)
    return _finish(StagePlan(stage["name"], "lora", detail), step)


def lora_stage_step(stage: dict[str, Any], config: dict[str, Any], gpus: int, work: Any,
                    device: str) -> tuple[Step, str]:
    """The LoRA stage's step over a frozen base, and a one-line description."""
    from fluxtune.default_plugins.adapters import DEFAULT_TARGETS

    adapter = stage.get("adapter") or {}
    targets, rank = adapter.get("targets") or list(DEFAULT_TARGETS), int(adapter.get("rank", 64))
    dropout = float(adapter.get("dropout", 0.05))
    checkpointing = bool(stage.get("gradient_checkpointing", False))
    optimizer, optimizer_params = _optimizer(stage)
    dtype = _compute_dtype(stage, device)
    params, lora = parameter_count(config), lora_parameter_count(config, targets, rank)
    adapted = [layer for layer in linear_layers(config) if targeted(layer.path, targets)]
    factors = [m for layer in adapted for m in (Linear(layer.path, layer.inputs, rank),
                                                 Linear(layer.path, rank, layer.outputs))]
    step = Step(config, {"image": work.image_tokens, "text": work.text_tokens}, work.batch, device)
    step.static["weights"] = params * DTYPE_BYTES[dtype]
    step.static["adapter"] = 4.0 * lora
    step.static["optimizer"] = optimizer_state_bytes(optimizer, factors, lora, optimizer_params)
    if gpus > 1:
        step.static["gradient buffers"] = 4.0 * lora  # DDP's bucket copy
    for layer in adapted:
        step.gradients[_segment(layer)] += 4.0 * rank * (layer.inputs + layer.outputs)
    if _accumulation(stage) > 1:
        step.held_gradients = 4.0 * lora
    step.moments["optimizer step"] = {"gradients": 4.0 * lora, "step temporaries": _step_temporary(
        optimizer, device, max(rank * max(layer.inputs, layer.outputs) for layer in adapted))}
    step.add_block_activations("frozen", dtype, checkpointing)
    step.add_outer_activations(False, dtype)
    adapter_activations(step, targets, rank, dropout, dtype, checkpointing)
    detail = (f"LoRA rank {rank} ({lora:,} params), frozen {'bf16' if dtype == 'bfloat16' else 'fp32'} base"
              + (", DDP" if gpus > 1 else ""))
    return step, _describe(detail, stage, optimizer, checkpointing)


def _segment(layer: Linear) -> str:
    from fluxtune.plan.inventory import segment_of

    return segment_of(layer.path)


def _describe(detail: str, stage: dict[str, Any], optimizer: str, checkpointing: bool) -> str:
    extras = [optimizer] + (["grad. checkpointing"] if checkpointing else [])
    if _accumulation(stage) > 1:
        extras.append(f"accumulation × {_accumulation(stage)}")
    return f"{detail}, {', '.join(extras)}"


def _finish(plan, step: Step):
    peak, moment, alive = step.walk()
    plan.offloaded_gib = step.offloaded / GiB
    plan.peak_gib = peak / GiB
    plan.moment = moment
    plan.parts = {kind: value / GiB for kind, value in alive.items()}
    return plan
