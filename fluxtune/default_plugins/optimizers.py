"""Built-in optimizers (`optimizer: {type: adamw | adamw8bit | adafactor | prodigy, …}` in a stage).

Each factory returns `make(parameters, device, sharded) -> torch.optim.Optimizer`: `device` is where the
optimizer's states live (the CPU when DeepSpeed offloads them), `sharded` is true when every rank holds only a
slice of the parameters (a DeepSpeed ZeRO engine), so an optimizer with global statistics must reduce them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class AdamWParams(Params):
    lr: float = Field(1.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1.0e-8, gt=0)


class AdamW:
    """torch's AdamW; its fused kernel on CUDA."""

    def __init__(self, params: AdamWParams):
        self.params = params

    def __call__(self, parameters: Any, device: Any, sharded: bool = False) -> Any:
        import torch

        p = self.params
        return torch.optim.AdamW(parameters, lr=p.lr, betas=tuple(p.betas), eps=p.eps, weight_decay=p.weight_decay,
                                 fused=device.type == "cuda")


class AdamW8bitParams(AdamWParams):
    requires_cuda: ClassVar[bool] = True  # `fluxtune validate` refuses it for an experiment on CPU


class AdamW8bit:
    """bitsandbytes' AdamW with 8-bit (block-wise quantised) moments: 2 bytes of state per parameter, not 8."""

    def __init__(self, params: AdamW8bitParams):
        self.params = params

    def __call__(self, parameters: Any, device: Any, sharded: bool = False) -> Any:
        import bitsandbytes as bnb

        p = self.params
        return bnb.optim.AdamW8bit(parameters, lr=p.lr, betas=tuple(p.betas), eps=p.eps,
                                   weight_decay=p.weight_decay)


class AdafactorParams(Params):
    lr: float = Field(1.0e-4, gt=0, description="an external learning rate (no relative step), so schedules apply")
    weight_decay: float = Field(0.0, ge=0)
    beta1: float | None = Field(None, ge=0, lt=1, description="first moment (None: none, the memory saving)")
    decay_rate: float = Field(-0.8, description="second-moment decay exponent")
    clip_threshold: float = Field(1.0, gt=0, description="RMS clipping of the update")


class Adafactor:
    """transformers' Adafactor with a fixed external learning rate (FLUX trainers' usual setting): factored second
    moments, about 0 bytes of state per parameter of a matrix. Under ZeRO each rank sees flat slices, which
    Adafactor cannot factor: prefer DDP or LoRA stages for it."""

    def __init__(self, params: AdafactorParams):
        self.params = params

    def __call__(self, parameters: Any, device: Any, sharded: bool = False) -> Any:
        from transformers.optimization import Adafactor as TransformersAdafactor

        p = self.params
        return TransformersAdafactor(parameters, lr=p.lr, weight_decay=p.weight_decay, beta1=p.beta1,
                                     decay_rate=p.decay_rate, clip_threshold=p.clip_threshold,
                                     scale_parameter=False, relative_step=False, warmup_init=False)


class ProdigyParams(Params):
    lr: float = Field(1.0, gt=0, description="a multiplier of the adapted step size: keep 1.0")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    d0: float = Field(1.0e-6, gt=0, description="initial step-size estimate")
    d_coef: float = Field(1.0, gt=0, description="scales the adapted step size")
    use_bias_correction: bool = False
    safeguard_warmup: bool = Field(False, description="recommended with a warm-up schedule")


class Prodigy:
    """prodigyopt's Prodigy: Adam whose step size estimates itself (learning-rate free)."""

    def __init__(self, params: ProdigyParams):
        self.params = params

    def __call__(self, parameters: Any, device: Any, sharded: bool = False) -> Any:
        from prodigyopt import Prodigy as ProdigyOptimizer

        p = self.params
        # Its step size sums statistics over every parameter: on ZeRO slices they must be all-reduced.
        return ProdigyOptimizer(parameters, lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay, d0=p.d0,
                                d_coef=p.d_coef, use_bias_correction=p.use_bias_correction,
                                safeguard_warmup=p.safeguard_warmup, fsdp_in_use=sharded)


@fluxtune.hookimpl
def register_optimizers(register):
    register("adamw", AdamW, params=AdamWParams, doc="torch AdamW (fused on CUDA)")
    register("adamw8bit", AdamW8bit, params=AdamW8bitParams, doc="bitsandbytes 8-bit AdamW (CUDA only)")
    register("adafactor", Adafactor, params=AdafactorParams, doc="transformers Adafactor, external learning rate")
    register("prodigy", Prodigy, params=ProdigyParams, doc="prodigyopt Prodigy (learning-rate free; lr 1.0)")
