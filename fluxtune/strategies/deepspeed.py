"""The full stage's DeepSpeed path: a ZeRO engine around the transformer, and a consolidated model out of it.

The engine lives for one stage. At its end every rank gathers the fp32 master weights (a collective) into a
fresh plain `FluxTransformer2DModel`, so the next stage (LoRA, another cycle) and the stage checkpoint get an
ordinary model — never DeepSpeed shards, never a module still carrying ZeRO's gradient hooks.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from fluxtune.api import Params


class DeepSpeedParams(Params):
    """The part of a DeepSpeed config fluxtune exposes (the rest is derived from the stage)."""

    zero_stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 2 shards gradients + optimizer states")
    bf16: bool = Field(True, description="bf16 weights/activations with fp32 master weights in the optimizer")
    offload_optimizer: bool = Field(False, description="keep optimizer states (and the step) in CPU memory")
    cpu_shm_allreduce: bool = Field(
        False, description="CPU only: DeepSpeed's shared-memory all-reduce (JIT-compiles ≈40 s once); off = gloo")
    reduce_bucket_size: int = Field(50_000_000, ge=1)


def deepspeed_config(params: DeepSpeedParams, micro_batch: int, world_size: int,
                     max_grad_norm: float | None) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": params.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": params.reduce_bucket_size,
    }
    if params.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": params.bf16},
        # We pass a torch optimizer: DeepSpeed's fused/CPU Adam JIT-compile for a minute on first use.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if max_grad_norm is not None:
        config["gradient_clipping"] = max_grad_norm
    return config


def import_deepspeed(device_type: str, shm_allreduce: bool = False):
    """Import DeepSpeed for `device_type`, choosing its accelerator before the import (it is fixed then)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if device_type == "cpu" and not shm_allreduce:
        # The CPU backend JIT-compiles a shared-memory all-reduce on first init (≈40 s on 2 cores) and its bf16
        # kernels need AVX-512; gloo, already set up by Ray Train, does the same reduction without either.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def start_engine(model: Any, optimizer: Any, config: dict[str, Any], device_type: str, shm_allreduce: bool):
    """`deepspeed.initialize` on the already-initialised process group (Ray Train's, or one we made)."""
    import logging

    import torch.distributed as dist

    deepspeed = import_deepspeed(device_type, shm_allreduce)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        raise RuntimeError("the DeepSpeed strategy needs a torch.distributed process group (Ray Train sets one up)")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def consolidated_transformer(engine: Any, device: Any) -> Any:
    """A plain fp32 transformer holding the engine's full master weights (a collective: call on every rank)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # not managed by the optimizer (frozen): its own value is already complete
            full = param.detach()
        state[name] = full.detach().to(device=device, dtype=torch.float32).clone()
    fresh = type(module).from_config(module.config)
    fresh.load_state_dict(state, strict=True)
    engine.destroy()  # removes ZeRO's gradient hooks and frees its buffers
    return fresh.to(device).train(module.training)


def train_with_deepspeed(ctx: Any, stage_params: Any) -> tuple[dict[str, float], Any]:
    """Run the full stage's steps under a ZeRO engine; returns (metrics, consolidated transformer)."""
    import time

    import torch

    ds: DeepSpeedParams = stage_params.deepspeed
    model = ctx.transformer
    model.requires_grad_(True)
    model.train()
    if stage_params.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ctx.optimizer(trainable, **stage_params.optimizer.model_dump())
    config = deepspeed_config(ds, ctx.shared.batch_size, ctx.world_size, stage_params.max_grad_norm)
    engine_started = time.perf_counter()
    engine = start_engine(model, optimizer, config, ctx.device.type, ds.cpu_shm_allreduce)
    engine_start_s = time.perf_counter() - engine_started
    dtype = torch.bfloat16 if ds.bf16 else torch.float32
    batches = ctx.batches()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(ctx.steps):
        batch = cast_batch(next(batches), dtype)
        loss = ctx.training_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        ctx.log(step, {"loss": loss.detach()})
        ctx.maybe_evaluate(step + 1, model=EngineView(engine))
    elapsed = time.perf_counter() - started
    step_cpu_s = (time.process_time() - cpu_started) / ctx.steps
    consolidation_started = time.perf_counter()
    transformer = consolidated_transformer(engine, ctx.device)
    consolidate_s = time.perf_counter() - consolidation_started
    if stage_params.gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    ctx.transformer = transformer
    return {"steps_per_s": ctx.steps / elapsed if elapsed > 0 else 0.0, "step_cpu_s": step_cpu_s,
            "engine_start_s": engine_start_s,
            "consolidate_s": consolidate_s}, transformer


def cast_batch(batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The engine's weights are bf16: feed it bf16 inputs. Position ids stay fp32 (RoPE needs exact integers)."""
    return {k: (v if k.endswith("_ids") or not v.is_floating_point() else v.to(dtype)) for k, v in batch.items()}


class EngineView:
    """The engine's module seen by the validation (bf16 weights: inputs are cast to match)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.module = engine.module
        self.dtype = next(engine.module.parameters()).dtype

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, **inputs: Any) -> Any:
        cast = {k: (v.to(self.dtype) if hasattr(v, "is_floating_point") and v.is_floating_point()
                    and not k.endswith("_ids") else v) for k, v in inputs.items()}
        return self.module(**cast)
