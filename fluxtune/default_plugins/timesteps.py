"""Built-in flow-matching timestep samplers (times in [0, 1], 1 = pure noise).

Each factory returns `sample(n, generator, image_seq_len) -> tensor[n]`; `image_seq_len` (packed image tokens)
lets a sampler shift towards noise at higher resolutions, as FLUX.1's own inference schedule does.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class UniformParams(Params):
    pass


class LogitNormalParams(Params):
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class SigmoidParams(Params):
    scale: float = Field(1.0, gt=0, description="t = sigmoid(scale · N(0, 1)); larger spreads t to the ends")


class ShiftParams(Params):
    shift: float = Field(3.0, gt=0, description="t' = shift·t / (1 + (shift − 1)·t); > 1 favours noisy times")
    base: str = Field("uniform", pattern="^(uniform|sigmoid)$", description="draw t from uniform or sigmoid")
    scale: float = Field(1.0, gt=0, description="sigmoid scale when base is sigmoid")


class FluxShiftParams(Params):
    """FLUX.1's resolution-dependent shift: μ grows linearly with the token count (the scheduler's defaults)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = Field(256, ge=1)
    max_seq_len: int = Field(4096, ge=2)
    scale: float = Field(1.0, gt=0, description="t is drawn as sigmoid(scale · N(0, 1)) before shifting")


def shift_times(t: Any, shift: float) -> Any:
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, p: FluxShiftParams) -> float:
    """diffusers' `calculate_shift`: μ interpolated between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    slope = (p.max_shift - p.base_shift) / (p.max_seq_len - p.base_seq_len)
    return image_seq_len * slope + (p.base_shift - slope * p.base_seq_len)


def exponential_time_shift(t: Any, mu: float) -> Any:
    """The scheduler's `time_shift` with σ = 1: exp(μ) / (exp(μ) + 1/t − 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def uniform(params: UniformParams):
    import torch

    def sample(n: int, generator: Any, image_seq_len: int) -> Any:
        return torch.rand(n, generator=generator)

    return sample


def logit_normal(params: LogitNormalParams):
    import torch

    def sample(n: int, generator: Any, image_seq_len: int) -> Any:
        return torch.sigmoid(params.mean + params.std * torch.randn(n, generator=generator))

    return sample


def sigmoid(params: SigmoidParams):
    import torch

    def sample(n: int, generator: Any, image_seq_len: int) -> Any:
        return torch.sigmoid(params.scale * torch.randn(n, generator=generator))

    return sample


def shifted(params: ShiftParams):
    draw = uniform(UniformParams()) if params.base == "uniform" else sigmoid(SigmoidParams(scale=params.scale))

    def sample(n: int, generator: Any, image_seq_len: int) -> Any:
        return shift_times(draw(n, generator, image_seq_len), params.shift)

    return sample


def flux_shift(params: FluxShiftParams):
    import torch

    def sample(n: int, generator: Any, image_seq_len: int) -> Any:
        t = torch.sigmoid(params.scale * torch.randn(n, generator=generator)).clamp(1e-6, 1 - 1e-6)
        return exponential_time_shift(t, flux_mu(image_seq_len, params))

    return sample


@fluxtune.hookimpl
def register_timestep_samplers(register):
    register("uniform", uniform, params=UniformParams, doc="t ~ U(0, 1)")
    register("logit_normal", logit_normal, params=LogitNormalParams, doc="t = sigmoid(N(mean, std)) (SD3)")
    register("sigmoid", sigmoid, params=SigmoidParams, doc="t = sigmoid(scale · N(0, 1)) (x-flux, kohya)")
    register("shift", shifted, params=ShiftParams, doc="uniform or sigmoid t, shifted by a constant (SD3 shift)")
    register("flux_shift", flux_shift, params=FluxShiftParams,
             doc="sigmoid t shifted by μ(image tokens), FLUX.1's resolution-dependent schedule")
