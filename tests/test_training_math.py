"""Timestep samplers and loss weightings: equal to diffusers' own formulas, selectable and searchable from YAML."""

import math

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3

from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text, sample_experiment
from fluxtune.default_plugins.losses import FlowMatchingLoss, FlowMatchingParams, time_weights
from fluxtune.default_plugins.timesteps import FluxShiftParams, exponential_time_shift, flux_mu
from fluxtune.flux.presets import FLUX_SCHEDULER

SAMPLERS = {
    "uniform": {},
    "logit_normal": {"mean": 0.3, "std": 1.2},
    "sigmoid": {"scale": 2.0},
    "shift": {"shift": 3.0},
    "flux_shift": {},
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_seeded_and_stays_inside_the_unit_interval(name):
    sample = loaded_components().get("timestep_sampler", name).build(SAMPLERS[name])
    a = sample(2000, torch.Generator().manual_seed(3), 256)
    assert torch.equal(a, sample(2000, torch.Generator().manual_seed(3), 256))
    assert a.shape == (2000,) and a.min() > 0 and a.max() < 1


def test_constant_shift_moves_times_towards_noise():
    components = loaded_components()
    plain = components.get("timestep_sampler", "uniform").build({})(4000, torch.Generator().manual_seed(0), 16)
    shifted = components.get("timestep_sampler", "shift").build({"shift": 3.0})(4000, torch.Generator().manual_seed(0), 16)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean() + 0.15


def test_flux_shift_is_the_schedulers_resolution_dependent_shift():
    params = FluxShiftParams()
    for tokens in (16, 256, 1024, 4096):
        assert flux_mu(tokens, params) == pytest.approx(calculate_shift(tokens))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    t = torch.linspace(0.05, 0.95, 7)
    assert torch.allclose(exponential_time_shift(t, 0.8), scheduler.time_shift(0.8, 1.0, t))
    sample = loaded_components().get("timestep_sampler", "flux_shift").build({})
    small = sample(4000, torch.Generator().manual_seed(0), 256)  # 256² px
    large = sample(4000, torch.Generator().manual_seed(0), 4096)  # 1024² px: noisier times
    assert large.mean() > small.mean() + 0.05


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_time_weights_match_diffusers(scheme):
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    assert torch.allclose(time_weights(t, scheme), compute_loss_weighting_for_sd3(scheme, t).float())
    assert torch.equal(time_weights(t, "none"), torch.ones(4))


def test_weighted_loss_is_the_weighted_mean_of_per_sample_errors():
    pred = torch.zeros(2, 3, 4)
    target = torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])  # per-sample errors 1 and 4
    t = torch.tensor([0.25, 0.5])
    batch = {"mask": torch.zeros(2, 3, 256), "t": t}
    loss = FlowMatchingLoss(FlowMatchingParams(weighting="cosmap"))(pred, target, batch)
    w = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.5)]
    assert loss.item() == pytest.approx((w[0] * 1 + w[1] * 4) / 2, rel=1e-6)


def test_sampler_and_weighting_are_selectable_and_searchable_from_yaml():
    spec, base = load_search_text("""
name: t
base:
  timesteps: {type: flux_shift, scale: 1.5}
  loss: {type: flow_matching, weighting: cosmap, mask_weight: 2.0}
  stages: [{name: full, type: full, steps: 1}]
search:
  space:
    loss.weighting: {type: categorical, choices: [none, sigma_sqrt, cosmap]}
    timesteps.scale: {type: float, low: 0.5, high: 2.0}
""")
    assert base["timesteps"]["type"] == "flux_shift" and base["loss"]["weighting"] == "cosmap"
    sampled = sample_experiment(base, {"loss.weighting": "sigma_sqrt", "timesteps.scale": 0.7}, loaded_components())
    assert sampled["loss"]["weighting"] == "sigma_sqrt" and sampled["timesteps"]["scale"] == 0.7
    from fluxtune.config.errors import InputError

    with pytest.raises(InputError, match="weighting"):
        load_search_text("""
name: t
base:
  loss: {type: flow_matching, weighting: cosine}
  stages: [{name: full, type: full, steps: 1}]
""")
