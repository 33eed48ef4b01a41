"""The flow-matching math and the built-in loss, checked against hand-written formulas."""

import torch

from fluxtune.default_plugins.losses import FlowMatchingLoss, FlowMatchingParams
from fluxtune.default_plugins.timesteps import LogitNormalParams, UniformParams, logit_normal, uniform
from fluxtune.flux.flow import noisy_latents, velocity_target


def test_noisy_latents_interpolate_from_data_to_noise():
    x0, noise = torch.randn(3, 16, 64), torch.randn(3, 16, 64)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy_latents(x0, noise, t)
    assert torch.equal(x_t[0], x0[0])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(x_t[2], noise[2])


def test_velocity_is_the_time_derivative_of_the_path():
    x0, noise = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    t, dt = torch.tensor([0.3, 0.6]), 1e-3
    finite_difference = (noisy_latents(x0, noise, t + dt) - noisy_latents(x0, noise, t)) / dt
    assert torch.allclose(finite_difference, velocity_target(x0, noise), atol=1e-3)


def test_plain_loss_is_mean_squared_error():
    pred, target = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    loss = FlowMatchingLoss(FlowMatchingParams())(pred, target, {"mask": torch.zeros(2, 16, 256)})
    assert torch.allclose(loss, ((pred - target) ** 2).mean())


def test_mask_weight_up_weights_tokens_inside_the_mask():
    pred = torch.zeros(1, 2, 4)
    target = torch.stack([torch.full((4,), 1.0), torch.full((4,), 3.0)])[None]  # token errors 1 and 9
    mask = torch.zeros(1, 2, 256)
    mask[0, 1, 5] = 1.0  # one pixel of token 1 is inside the hole
    loss = FlowMatchingLoss(FlowMatchingParams(mask_weight=2.0))(pred, target, {"mask": mask})
    # weights 1 and 3: (1*1 + 3*9) / (1 + 3)
    assert torch.isclose(loss, torch.tensor(28.0 / 4.0))


def test_timestep_samplers_stay_in_the_unit_interval_and_follow_their_seed():
    for sampler in (uniform(UniformParams()), logit_normal(LogitNormalParams(mean=0.5, std=2.0))):
        a = sampler(1000, torch.Generator().manual_seed(1), 16)
        b = sampler(1000, torch.Generator().manual_seed(1), 16)
        assert torch.equal(a, b)
        assert a.min() >= 0 and a.max() <= 1
    shifted = logit_normal(LogitNormalParams(mean=1.0))(4000, torch.Generator().manual_seed(0), 16)
    assert shifted.mean() > 0.6  # a positive mean pushes t towards noise
