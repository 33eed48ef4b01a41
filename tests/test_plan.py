"""`fluxtune plan`: exact counts (built models, peft, a real DeepSpeed engine), exact FLOPs (torch's FlopCounterMode),
the dtype policy of each strategy and optimizer, what it cannot size, the verdict for FLUX.1-Fill-dev on 8 × 80 GB,
and the command itself (import-light, --set, exit 2 on bad input). How close the memory plan comes to measured peaks
at real width is a benchmark (benchmarks/plan_accuracy.py, BENCHMARKS.md); its script is run here on tiny-fill."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxtune.default_plugins.adapters import DEFAULT_TARGETS, LoraAdapter, LoraParams
from fluxtune.flux.model import build_tiny_fill, empty_transformer
from fluxtune.flux.packing import latent_image_ids, text_ids
from fluxtune.flux.presets import FLUX_FILL_DEV_TRANSFORMER, FLUX_FILL_DEV_TRANSFORMER_PARAMS, TINY_FILL_TRANSFORMER
from fluxtune.plan import (
    GiB,
    Workload,
    linear_layers,
    lora_parameter_count,
    parameter_count,
    plan_stages,
    training_flops,
)
from fluxtune.plan.stages import full_stage_step, lora_stage_step

ROOT = Path(__file__).resolve().parents[1]
OTHER = {**TINY_FILL_TRANSFORMER, "num_layers": 2, "num_single_layers": 3, "num_attention_heads": 3,
         "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4], "guidance_embeds": False}
P = FLUX_FILL_DEV_TRANSFORMER_PARAMS
AT_1024 = Workload(resolution=1024, batch=1, text_tokens=512)


def test_parameter_count_is_exact_for_built_models_and_flux_fill_dev():
    for config in (TINY_FILL_TRANSFORMER, OTHER):
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    for preset in ("proxy-fill", "proxy-fill-8"):
        model = empty_transformer({"preset": preset})
        assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    assert parameter_count(FLUX_FILL_DEV_TRANSFORMER) == P == 11_902_391_360


def test_linear_inventory_matches_the_module_tree():
    model = build_tiny_fill().transformer
    built = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.path: (layer.inputs, layer.outputs) for layer in linear_layers(TINY_FILL_TRANSFORMER)} == built


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ["to_q", "proj_mlp", "proj_out", "x_embedder"]])
def test_lora_count_equals_peft_trainable_parameters(targets):
    model = build_tiny_fill().transformer
    trainable = LoraAdapter(LoraParams(rank=8, targets=targets)).attach(model)
    assert lora_parameter_count(TINY_FILL_TRANSFORMER, targets, 8) == sum(p.numel() for p in trainable)
    # ≈179 M LoRA params for the real model at rank 64 on attention + FF targets
    assert lora_parameter_count(FLUX_FILL_DEV_TRANSFORMER, DEFAULT_TARGETS, 64) == pytest.approx(179e6, rel=0.01)


@pytest.mark.parametrize("targets", [None, DEFAULT_TARGETS, ["attn.to_q"], ["proj_mlp", "ff.net.2"],
                                     ["linear_2", "norm1.linear"]],
                         ids=["full", "lora-default", "lora-to_q", "lora-mlp", "lora-time-embedding"])
def test_training_flops_equal_torchs_flop_counter(targets):
    """Every matrix product of forward + backward, counted by torch (attention through the math kernel, which
    computes exactly the products the model counts: no recomputation)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_tiny_fill().transformer
    if targets is not None:
        LoraAdapter(LoraParams(rank=4, targets=targets, dropout=0.0)).attach(model)
    batch, resolution, text = 2, 64, 32
    image = (resolution // 16) ** 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(hidden_states=torch.randn(batch, image, 384), encoder_hidden_states=torch.randn(batch, text, 32),
                    pooled_projections=torch.randn(batch, 32), timestep=torch.full((batch,), 0.5),
                    guidance=torch.full((batch,), 30.0), img_ids=latent_image_ids(resolution, resolution),
                    txt_ids=text_ids(text), return_dict=False)[0]
        out.pow(2).mean().backward()
    assert training_flops(TINY_FILL_TRANSFORMER, image, text, batch, targets=targets, rank=4) \
        == counter.get_total_flops()


def ds_engine_tensors():
    """A real ZeRO-2 bf16 engine on the tiny model after two steps: bytes of its weights, fp32 master + states, and
    its gradient partition (world size 1, so the partition is everything)."""
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
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        config = deepspeed_config(DeepSpeedParams(), 2, 1, 1.0)
        engine = start_engine(model, optimizer, config, "cpu", False)
        for _ in range(2):
            out = engine(hidden_states=torch.randn(2, 16, 384, dtype=torch.bfloat16), timestep=torch.tensor([.5, .5]),
                         guidance=torch.full((2,), 30.0), pooled_projections=torch.randn(2, 32, dtype=torch.bfloat16),
                         encoder_hidden_states=torch.randn(2, 8, 32, dtype=torch.bfloat16),
                         txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)[0]
            engine.backward(out.float().pow(2).mean())
            partition = sum(g.numel() * g.element_size() for group in engine.optimizer.averaged_gradients.values()
                            for g in group)
            engine.step()
        zero = engine.optimizer
        found = {
            "weights": sum(p.numel() * p.element_size() for p in engine.module.parameters()),
            "optimizer": sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
            + sum(v.numel() * v.element_size() for s in zero.optimizer.state.values() for v in s.values()
                  if torch.is_tensor(v) and v.numel() > 1),
            "partition": partition, "bucket": config["zero_optimization"]["reduce_bucket_size"],
        }
        engine.destroy()
        return found
    finally:
        if started_here:
            dist.destroy_process_group()


def test_zero2_state_equals_a_real_deepspeed_engines_tensors():
    """bf16 weights 2 B/param, fp32 master + exp_avg + exp_avg_sq 12 B/param, bf16 gradient partition 2 B/param and
    one reduce bucket of bf16 gradients."""
    found = ds_engine_tensors()
    params = parameter_count(TINY_FILL_TRANSFORMER)
    stage = {"name": "f", "type": "full", "strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "bf16": True}}
    step, detail = full_stage_step(stage, TINY_FILL_TRANSFORMER, 1, Workload(32, 2, 32), "cuda")
    assert "ZeRO-2 bf16" in detail
    assert step.static["weights"] == found["weights"] == 2 * params
    assert step.static["optimizer"] == found["optimizer"] == 12 * params
    assert step.backward_buffers["gradient buffers"] == found["partition"] + 2 * found["bucket"]


def test_dtype_policy_per_strategy_on_flux_fill_dev():
    full = {"name": "f", "type": "full"}
    ddp, _ = full_stage_step({**full, "strategy": "ddp"}, FLUX_FILL_DEV_TRANSFORMER, 8, AT_1024, "cuda")
    assert (ddp.static["weights"], ddp.static["optimizer"], ddp.static["gradient buffers"]) == (4 * P, 8 * P, 4 * P)
    assert sum(ddp.gradients.values()) == 4 * P  # param.grad, filled during backward
    zero, detail = full_stage_step(full, FLUX_FILL_DEV_TRANSFORMER, 8, AT_1024, "cuda")  # auto on GPU: ZeRO-2 bf16
    assert detail.startswith("DeepSpeed ZeRO-2 bf16")
    assert zero.static["weights"] == 2 * P and zero.static["optimizer"] == 12 * P / 8
    assert zero.moments["optimizer step"] == {"fp32 gradients": 4 * P / 8, "step temporaries": 0}  # fused AdamW
    lora = {"name": "l", "type": "lora", "adapter": {"type": "lora", "rank": 64}}
    lora_params = lora_parameter_count(FLUX_FILL_DEV_TRANSFORMER, DEFAULT_TARGETS, 64)
    on_gpu, _ = lora_stage_step(lora, FLUX_FILL_DEV_TRANSFORMER, 8, AT_1024, "cuda")
    on_cpu, _ = lora_stage_step(lora, FLUX_FILL_DEV_TRANSFORMER, 1, AT_1024, "cpu")
    assert on_gpu.static["weights"] == 2 * P and on_cpu.static["weights"] == 4 * P  # frozen base bf16 on GPU only
    assert on_gpu.static["adapter"] == 4 * lora_params and on_gpu.static["optimizer"] == 8 * lora_params


@pytest.mark.parametrize("optimizer, low, high", [("adamw", 8, 8), ("adamw8bit", 2, 2.1), ("prodigy", 16, 16),
                                                  ("adafactor", 0, 0.01)])
def test_optimizer_states_per_parameter(optimizer, low, high):
    stage = {"name": "f", "type": "full", "strategy": "ddp", "optimizer": {"type": optimizer, "lr": 1e-4}}
    step, detail = full_stage_step(stage, FLUX_FILL_DEV_TRANSFORMER, 8, AT_1024, "cuda")
    assert low <= step.static["optimizer"] / P <= high and optimizer in detail


def test_under_zero_adafactor_cannot_factor_the_flat_partition():
    stage = {"name": "f", "type": "full", "strategy": "deepspeed", "optimizer": {"type": "adafactor", "lr": 1e-4}}
    step, _ = full_stage_step(stage, FLUX_FILL_DEV_TRANSFORMER, 8, AT_1024, "cuda")
    assert step.static["optimizer"] == (4 + 4) * P / 8  # fp32 master + a full second moment, partitioned


def test_what_the_planner_cannot_size_is_unknown_not_guessed():
    experiment = {"data": {"resolution": 512, "batch_size": 1}, "stages": [
        {"name": "ema", "type": "ema_full"},
        {"name": "dora", "type": "lora", "adapter": {"type": "dora", "rank": 8}},
        {"name": "lion", "type": "full", "optimizer": {"type": "lion", "lr": 1e-5}},
        {"name": "ok", "type": "full"}]}
    plugin_stage, plugin_adapter, plugin_optimizer, known = plan_stages(experiment, FLUX_FILL_DEV_TRANSFORMER, 8)
    for plan in (plugin_stage, plugin_adapter, plugin_optimizer):
        assert plan.peak_gib is None and plan.fits(80) is None and plan.unknown
    assert "ema_full" in plugin_stage.unknown and "dora" in plugin_adapter.unknown and "lion" in plugin_optimizer.unknown
    assert known.peak_gib > 0 and known.fits(141) is not None


def test_gradient_accumulation_keeps_gradients_through_the_next_micro_batch():
    stage = {"name": "f", "type": "full", "strategy": "ddp", "gradient_checkpointing": True}
    one = plan_stages({"data": {"resolution": 512, "batch_size": 2}, "stages": [stage]}, FLUX_FILL_DEV_TRANSFORMER, 8)
    four = plan_stages({"data": {"resolution": 512, "batch_size": 2},
                        "stages": [{**stage, "gradient_accumulation_steps": 4}]}, FLUX_FILL_DEV_TRANSFORMER, 8)
    assert four[0].total > one[0].total  # a whole set of gradients is alive while the next micro-batch backs up
    assert four[0].total - one[0].total < 4 * P / GiB + 0.01  # but activations stay per micro-batch


def test_flux_fill_dev_on_8_x_80_gb():
    """What fits at 1024² px, one sample per GPU: the full stage under ZeRO-2 with gradient checkpointing, the LoRA
    stage with checkpointing; not without checkpointing, and never the full stage under DDP (16+ B/param)."""
    def stage(**keys):
        return {"name": "s", "type": "full", **keys}
    experiment = {"data": {"resolution": 1024, "batch_size": 1}, "stages": [
        stage(gradient_checkpointing=True), stage(), stage(strategy="ddp", gradient_checkpointing=True),
        {"name": "lora", "type": "lora", "adapter": {"type": "lora", "rank": 64}, "gradient_checkpointing": True}]}
    zero2, no_checkpointing, ddp, lora = plan_stages(experiment, FLUX_FILL_DEV_TRANSFORMER, gpus=8)
    assert zero2.fits(80) and lora.fits(80)
    assert not no_checkpointing.fits(80) and not ddp.fits(80)
    assert 40 < zero2.total < 70 and lora.parts["weights"] == pytest.approx(22.2, abs=0.1)


def run_plan(*args, cwd):
    code = ("import sys; from fluxtune.cli.main import main; sys.argv = ['fluxtune', 'plan', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n    assert 'torch' not in sys.modules, 'plan imported torch'")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "160"})


def test_plan_command_prints_both_models_without_importing_torch(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: p\nbase:\n  data: {resolution: 1024, batch_size: 1}\n  stages:\n"
                    "    - {name: full, type: full, steps: 1, gradient_checkpointing: true}\n"
                    "    - {name: lora, type: lora, steps: 1, gradient_checkpointing: true}\n")
    result = run_plan(str(spec), "--gpus", "8", "--gpu-mem", "80", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "91,904 params" in result.stdout and "11.90 B params" in result.stdout
    assert "DeepSpeed ZeRO-2 bf16" in result.stdout and "TFLOP/step" in result.stdout
    small = run_plan(str(spec), "--gpus", "2", "--gpu-mem", "24", cwd=tmp_path)
    assert small.returncode == 0 and " no " in small.stdout
    proxy = run_plan(str(spec), "--gpus", "1", "--gpu-mem", "141", "--set", "base.model.preset=proxy-fill",
                     "--no-reference", cwd=tmp_path)
    assert proxy.returncode == 0 and "preset proxy-fill: 546.53 M params" in proxy.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nbase:\n  stages:\n    - {name: full, type: ful, steps: 1}\n")
    refused = run_plan(str(bad), "--gpus", "1", "--gpu-mem", "80", cwd=tmp_path)
    assert refused.returncode == 2 and "bad.yaml" in refused.stderr + refused.stdout
    unknown_preset = run_plan(str(spec), "--gpus", "1", "--gpu-mem", "80", "--set", "base.model.preset=proxy",
                              cwd=tmp_path)
    assert unknown_preset.returncode == 2 and "proxy-fill-8" in unknown_preset.stderr + unknown_preset.stdout


def test_plan_accuracy_script_measures_a_stage_beside_its_plan():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_accuracy.py"), "--smoke", "--only",
                             "lora", "--no-blocks"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
                                "PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("lora:tiny-fill:32px"))
    measured, planned = (float(v) for v in row.split()[2:4])
    assert measured > 0 and planned > 0
