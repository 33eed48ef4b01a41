"""Built-in flow-matching timestep samplers (times in [0, 1], 1 = pure noise)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

import fluxtune
from fluxtune.api import Params


class UniformParams(Params):
    pass


class LogitNormalParams(Params):
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


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


@fluxtune.hookimpl
def register_timestep_samplers(register):
    register("uniform", uniform, params=UniformParams, doc="t ~ U(0, 1)")
    register("logit_normal", logit_normal, params=LogitNormalParams, doc="t = sigmoid(N(mean, std)) (SD3)")
