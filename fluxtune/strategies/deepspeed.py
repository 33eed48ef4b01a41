"""The full stage's DeepSpeed path: a ZeRO engine around the transformer, its fp32 masters exact at both ends.

The engine lives for one stage. At its start the masters are set from the canonical fp32 weights (DeepSpeed
would build them from the bf16 module, rounding). At its end the stage checkpoint gathers them parameter by
parameter (a collective; rank 0 writes), then the engine is destroyed and its bf16 module, stripped of ZeRO's
hooks and attributes, stays the live transformer: no fresh full-precision model on any rank.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Literal

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
                     max_grad_norm: float | None, accumulation: int = 1) -> dict[str, Any]:
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
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
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


class EngineMasters:
    """The engine's fp32 master weights (a `fluxtune.canonical.Weights`), gathered one parameter at a time (a
    collective on every rank); closing destroys the engine and strips what DeepSpeed attached to the parameters,
    leaving its module a plain (bf16) transformer."""

    def __init__(self, engine: Any, own_attributes: dict[int, set[str]]):
        self.engine = engine
        self.own_attributes = own_attributes  # per parameter, the attributes it had before the engine

    def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        from fluxtune.canonical import plain_state

        state = plain_state(self.engine.module)
        for name in state if names is None else names:
            tensor = state[name]
            full = safe_get_full_fp32_param(tensor) if isinstance(tensor, torch.nn.Parameter) else None
            if full is None:  # not managed by the optimizer (frozen, a buffer): its own value is complete
                full = tensor.detach()
            yield name, full.detach().to(torch.float32)

    def close(self) -> None:
        module = self.engine.module
        self.engine.destroy()  # removes ZeRO's gradient hooks, frees its buffers (ZeRO-3: params whole again)
        for param in module.parameters():
            # The fragments' mappings would keep the fp32 partitions (and optimizer states) alive.
            for attribute in set(vars(param)) - self.own_attributes.get(id(param), set()):
                delattr(param, attribute)


def load_masters(engine: Any, weights: Any) -> None:
    """Set the engine's fp32 master weights to the canonical values: the engine built them from its bf16 module,
    rounding away what bf16 cannot hold (a merged LoRA delta, say). Streamed, one parameter at a time."""
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(engine.module.named_parameters())
    for name, value in weights.tensors(list(params)):
        safe_set_full_fp32_param(params[name], value)


def train_with_deepspeed(ctx: Any, stage_params: Any) -> dict[str, float]:
    """Run the full stage's updates under a ZeRO engine. The engine's module stays the live transformer; the
    stage checkpoint is gathered from its fp32 masters (`ctx.trained_weights`)."""
    import time

    import torch

    from fluxtune.default_plugins.optim import current_lr, lr_schedule

    ds: DeepSpeedParams = stage_params.deepspeed
    model = ctx.transformer
    model.requires_grad_(True)
    model.train()
    if stage_params.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    own_attributes = {id(p): set(vars(p)) for p in model.parameters()}
    states_on = torch.device("cpu") if ds.offload_optimizer else ctx.device
    optimizer = ctx.build_optimizer(trainable, stage_params.optimizer.settings(), device=states_on,
                                    sharded=ctx.world_size > 1)
    micro_batches = stage_params.gradient_accumulation_steps
    config = deepspeed_config(ds, ctx.setup.batch_size, ctx.world_size, stage_params.max_grad_norm, micro_batches)
    engine_started = time.perf_counter()
    engine = start_engine(model, optimizer, config, ctx.device.type, ds.cpu_shm_allreduce)
    if ds.bf16 and ctx.weights is not None:  # None: the module's own values are the canonical ones
        load_masters(engine, ctx.weights)
    engine_start_s = time.perf_counter() - engine_started
    scheduler = lr_schedule(optimizer, stage_params, ctx.steps)
    dtype = torch.bfloat16 if ds.bf16 else torch.float32
    batches = ctx.batches()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(ctx.steps):
        total = torch.zeros((), device=ctx.device)
        lr = current_lr(optimizer)
        for _ in range(micro_batches):
            loss = ctx.training_loss(engine, cast_batch(next(batches), dtype))
            engine.backward(loss)  # scaled by 1/micro_batches inside
            engine.step()  # the optimizer steps (clipping the summed gradient) after the last micro-batch only
            total += loss.detach().float()
        scheduler.step()
        ctx.log(step, {"loss": total / micro_batches, "lr": lr})
        ctx.maybe_evaluate(step + 1, model=engine.module)
    elapsed = time.perf_counter() - started
    if stage_params.gradient_checkpointing:
        model.disable_gradient_checkpointing()
    ctx.transformer = engine.module
    ctx.trained_weights = EngineMasters(engine, own_attributes)
    return {"steps_per_s": ctx.steps / elapsed if elapsed > 0 else 0.0,
            "step_cpu_s": (time.process_time() - cpu_started) / ctx.steps, "engine_start_s": engine_start_s}


def cast_batch(batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The engine's weights are bf16: feed it bf16 inputs. Position ids stay fp32 (RoPE needs exact integers)."""
    return {k: (v if k.endswith("_ids") or not v.is_floating_point() else v.to(dtype)) for k, v in batch.items()}
