"""The `masked_l1` loss: weights follow the mask, bad params fail validation at their YAML key, it trains."""

import pytest
import torch

import fluxtune.testing as ft
import fluxtune_masked_l1
from fluxtune.config.errors import InputError


def loss(**params):
    with ft.registered_plugin(fluxtune_masked_l1) as components:
        return components.get("loss", "masked_l1").build({"type": "masked_l1", **params})


def batch_with_mask(inside_tokens):
    mask = torch.zeros(1, 4, 256)
    mask[0, inside_tokens, :3] = 1.0  # a few masked pixels are enough to make a token "inside"
    return {"mask": mask}


def test_errors_outside_the_mask_count_with_the_outside_weight():
    target = torch.zeros(1, 4, 64)
    pred = target.clone()
    pred[0, 0] = 2.0  # an L1 error of 2 on token 0 only
    batch = batch_with_mask([1, 2, 3])  # token 0 is outside
    assert loss(inside=1.0, outside=0.0)(pred, target, batch) == 0
    # weights: 0.5 outside (token 0), 1.0 inside × 3 → 2·0.5 / 3.5
    assert torch.isclose(loss(inside=1.0, outside=0.5)(pred, target, batch), torch.tensor(1.0 / 3.5))


def test_mse_term_adds_squared_error():
    target, pred = torch.zeros(1, 4, 64), torch.full((1, 4, 64), 3.0)
    batch = batch_with_mask([0, 1, 2, 3])
    assert torch.isclose(loss(mse=0.5)(pred, target, batch), torch.tensor(3.0 + 0.5 * 9.0))


def test_all_zero_weights_fail_validation_at_the_loss_key():
    with ft.registered_plugin(fluxtune_masked_l1):
        with pytest.raises(InputError) as error:
            ft.tiny_experiment("""
                stages: [{name: full, type: full, steps: 1}]
                loss: {type: masked_l1, inside: 0, outside: 0}
            """)
    [problem] = error.value.problems
    assert problem.key == "base.loss" and "both 0" in problem.message and problem.line == 4


def test_training_with_the_loss_lowers_the_validation_mse():
    with ft.registered_plugin(fluxtune_masked_l1):
        run = ft.run_tiny("""
            eval_every: 100
            loss: {type: masked_l1, inside: 1.0, outside: 0.2}
            stages: [{name: full, type: full, steps: 30, optimizer: {lr: 2.0e-3}}]
        """)
    assert run.val_loss < 0.9 * run.initial_val_loss
