"""`fluxtune plan`: exact parameter/LoRA counts and ZeRO optimizer sizes (checked against the built tiny model and a
real DeepSpeed engine), FLUX.1-Fill-dev figures, and the command itself (import-light, exit 2 on bad input)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxtune.default_plugins.adapters import DEFAULT_TARGETS, LoraAdapter, LoraParams
from fluxtune.flux.model import build_tiny_fill
from fluxtune.flux.presets import FLUX_FILL_DEV_TRANSFORMER, FLUX_FILL_DEV_TRANSFORMER_PARAMS, TINY_FILL_TRANSFORMER
from fluxtune.plan import (
    GiB,
    full_stage_bytes,
    linear_layers,
    lora_parameter_count,
    parameter_count,
    plan_stages,
)

OTHER = {**TINY_FILL_TRANSFORMER, "num_layers": 2, "num_single_layers": 3, "num_attention_heads": 3,
         "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4], "guidance_embeds": False}


def test_parameter_count_is_exact_for_built_models_and_flux_fill_dev():
    for config in (TINY_FILL_TRANSFORMER, OTHER):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert parameter_count(FLUX_FILL_DEV_TRANSFORMER) == FLUX_FILL_DEV_TRANSFORMER_PARAMS == 11_902_391_360


def test_linear_inventory_matches_the_module_tree():
    model = build_tiny_fill().transformer
    built = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.path: (layer.inputs, layer.outputs) for layer in linear_layers(TINY_FILL_TRANSFORMER)} == built


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ["to_q", "proj_mlp", "proj_out", "x_embedder"]])
def test_lora_count_equals_peft_trainable_parameters(targets):
    model = build_tiny_fill().transformer
    trainable = LoraAdapter(LoraParams(rank=8, targets=targets)).attach(model)
    assert lora_parameter_count(TINY_FILL_TRANSFORMER, targets, 8) == sum(p.numel() for p in trainable)
    # FACTS: ≈179 M LoRA params for the real model at rank 64 on attention + FF targets
    assert lora_parameter_count(FLUX_FILL_DEV_TRANSFORMER, DEFAULT_TARGETS, 64) == pytest.approx(179e6, rel=0.01)


def test_zero2_sizes_equal_a_real_deepspeed_engines_tensors():
    """bf16 weights 2 B/param, fp32 master + exp_avg + exp_avg_sq 12 B/param (world size 1: nothing sharded)."""
    import torch.distributed as dist

    from fluxtune.strategies.deepspeed import DeepSpeedParams, deepspeed_config, start_engine

    started_here = not dist.is_initialized()
    if started_here:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = build_tiny_fill().transformer
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = start_engine(model, optimizer, deepspeed_config(DeepSpeedParams(), 2, 1, 1.0), "cpu", False)
        # one real step, so the optimizer states exist
        out = engine(hidden_states=torch.randn(2, 16, 384, dtype=torch.bfloat16), timestep=torch.tensor([0.5, 0.5]),
                     guidance=torch.full((2,), 30.0), pooled_projections=torch.randn(2, 32, dtype=torch.bfloat16),
                     encoder_hidden_states=torch.randn(2, 8, 32, dtype=torch.bfloat16), txt_ids=torch.zeros(8, 3),
                     img_ids=torch.zeros(16, 3), return_dict=False)[0]
        engine.backward(out.float().pow(2).mean())
        engine.step()
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        zero = engine.optimizer
        master = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
        states = sum(v.numel() * v.element_size() for s in zero.optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v) and v.numel() > 1)
        expected = full_stage_bytes(params, gpus=1, zero_stage=2, bf16=True, offload=False)
        assert weight_bytes == expected["weights"] == 2 * params
        assert master + states == expected["optimizer"] == 12 * params
        engine.destroy()
    finally:
        if started_here:
            dist.destroy_process_group()


def test_flux_fill_dev_figures_match_the_known_zero2_budget():
    """FACTS: ZeRO-2 bf16 + AdamW ≈61 GiB per GPU on 4 GPUs, ≈42 on 8, ≈25-28 with optimizer offload; LoRA ≈22."""
    p = FLUX_FILL_DEV_TRANSFORMER_PARAMS
    states = lambda gpus, offload=False: sum(  # noqa: E731
        v for k, v in full_stage_bytes(p, gpus, 2, True, offload).items() if k != "offloaded") / GiB
    assert states(4) == pytest.approx(61, abs=1) and states(8) == pytest.approx(42, abs=1)
    assert 25 <= states(4, offload=True) <= 28
    experiment = {"data": {"resolution": 1024, "batch_size": 1},
                  "stages": [{"name": "full", "type": "full", "gradient_checkpointing": True},
                             {"name": "full-nogc", "type": "full"},
                             {"name": "lora", "type": "lora", "adapter": {"rank": 64}}]}
    full, no_checkpointing, lora = plan_stages(experiment, FLUX_FILL_DEV_TRANSFORMER, gpus=8)
    assert full.parts["activations"] == pytest.approx(2.4, abs=0.3)
    assert no_checkpointing.parts["activations"] == pytest.approx(47, rel=0.05)
    assert full.fits(80) and not no_checkpointing.fits(80)
    assert lora.parts["weights"] == pytest.approx(22.2, abs=0.1)


def run_plan(*args, cwd):
    code = ("import sys; from fluxtune.cli.main import main; sys.argv = ['fluxtune', 'plan', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n    assert 'torch' not in sys.modules, 'plan imported torch'")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})


def test_plan_command_prints_both_models_without_importing_torch(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: p\nbase:\n  data: {resolution: 1024, batch_size: 1}\n  stages:\n"
                    "    - {name: full, type: full, steps: 1, gradient_checkpointing: true}\n"
                    "    - {name: lora, type: lora, steps: 1}\n")
    result = run_plan(str(spec), "--gpus", "8", "--gpu-mem", "80", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "91,904 params" in result.stdout and "11.90 B params" in result.stdout
    assert "DeepSpeed ZeRO-2 bf16" in result.stdout and "yes" in result.stdout
    small = run_plan(str(spec), "--gpus", "2", "--gpu-mem", "24", cwd=tmp_path)
    assert small.returncode == 0 and "no" in small.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nbase:\n  stages:\n    - {name: full, type: ful, steps: 1}\n")
    refused = run_plan(str(bad), "--gpus", "1", "--gpu-mem", "80", cwd=tmp_path)
    assert refused.returncode == 2 and "bad.yaml" in refused.stderr + refused.stdout
