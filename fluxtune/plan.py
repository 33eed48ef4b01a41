"""Memory planning: what each stage of an experiment needs per GPU, from the transformer config alone.

No torch here (the `plan` command stays import-light). Parameter counts are exact: every Linear and norm weight of
FluxTransformer2DModel is listed from the config (tests compare with the built models). Optimizer and gradient
sizes follow DeepSpeed ZeRO's partitioning (tests compare with a real engine's tensors on the tiny model).
Activations are an estimate: ACTIVATION_VALUES_PER_TOKEN values of width `inner_dim` per token and block, a
constant calibrated to a measured ≈47 GiB per 1024² sample for FLUX.1-Fill-dev in bf16 without checkpointing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from fluxtune.flux import presets

GiB = 1024**3
ACTIVATION_VALUES_PER_TOKEN = 31  # × inner_dim, per block, without gradient checkpointing (see module doc)
RESERVE_GIB = 2.0  # CUDA context, allocator fragmentation, NCCL buffers
TEXT_TOKENS = {"tiny-fill": presets.TINY_T5_MAX_LENGTH}
DEFAULT_TEXT_TOKENS = 512  # FLUX.1-dev's T5 sequence length


@dataclass(frozen=True)
class Linear:
    path: str
    inputs: int
    outputs: int

    @property
    def params(self) -> int:
        return self.inputs * self.outputs + self.outputs  # every Linear of the FLUX transformer has a bias


def linear_layers(config: dict[str, Any]) -> list[Linear]:
    """Every nn.Linear of FluxTransformer2DModel(**config), by module path."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    out: list[Linear] = [
        Linear("x_embedder", config["in_channels"], d),
        Linear("context_embedder", config["joint_attention_dim"], d),
        Linear("time_text_embed.timestep_embedder.linear_1", 256, d),
        Linear("time_text_embed.timestep_embedder.linear_2", d, d),
        Linear("time_text_embed.text_embedder.linear_1", config["pooled_projection_dim"], d),
        Linear("time_text_embed.text_embedder.linear_2", d, d),
        Linear("norm_out.linear", d, 2 * d),
        Linear("proj_out", d, config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])),
    ]
    if config.get("guidance_embeds"):
        out += [Linear("time_text_embed.guidance_embedder.linear_1", 256, d),
                Linear("time_text_embed.guidance_embedder.linear_2", d, d)]
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}"
        out += [Linear(f"{p}.norm1.linear", d, 6 * d), Linear(f"{p}.norm1_context.linear", d, 6 * d)]
        out += [Linear(f"{p}.attn.{n}", d, d) for n in
                ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        out += [Linear(f"{p}.ff.net.0.proj", d, 4 * d), Linear(f"{p}.ff.net.2", 4 * d, d),
                Linear(f"{p}.ff_context.net.0.proj", d, 4 * d), Linear(f"{p}.ff_context.net.2", 4 * d, d)]
    for i in range(config["num_single_layers"]):
        p = f"single_transformer_blocks.{i}"
        out += [Linear(f"{p}.norm.linear", d, 3 * d), Linear(f"{p}.proj_mlp", d, 4 * d),
                Linear(f"{p}.proj_out", 5 * d, d)]
        out += [Linear(f"{p}.attn.{n}", d, d) for n in ("to_q", "to_k", "to_v")]
    return out


def parameter_count(config: dict[str, Any]) -> int:
    """Exact parameter count: the Linears plus the RMSNorm weights of q/k (double blocks: 4, single: 2)."""
    head = config["attention_head_dim"]
    norms = head * (4 * config["num_layers"] + 2 * config["num_single_layers"])
    return sum(layer.params for layer in linear_layers(config)) + norms


def lora_parameter_count(config: dict[str, Any], targets: list[str], rank: int) -> int:
    """LoRA A and B of every Linear whose path is a target or ends with '.' + target (peft's rule)."""
    return sum(rank * (layer.inputs + layer.outputs) for layer in linear_layers(config)
               if any(layer.path == t or layer.path.endswith("." + t) for t in targets))


@dataclass
class StagePlan:
    name: str
    kind: str  # "full" or "lora"
    detail: str
    parts: dict[str, float] = field(default_factory=dict)  # GiB per GPU
    offloaded_gib: float = 0.0  # optimizer state held in CPU memory instead (per GPU)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_mem_gib: float) -> bool:
        return self.total + RESERVE_GIB <= gpu_mem_gib


def activation_gib(config: dict[str, Any], resolution: int, text_tokens: int, batch: int,
                   checkpointing: bool, bytes_per_value: int = 2) -> float:
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    tokens = (resolution // 16) ** 2 + text_tokens
    per_block = ACTIVATION_VALUES_PER_TOKEN * d * tokens * bytes_per_value
    if checkpointing:  # each block keeps its input; one block at a time is recomputed with all its activations
        total = blocks * d * tokens * bytes_per_value + per_block
    else:
        total = blocks * per_block
    return batch * total / GiB


def full_stage_bytes(params: int, gpus: int, zero_stage: int, bf16: bool, offload: bool) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and AdamW states under DeepSpeed ZeRO (stage 0 = plain DDP)."""
    weight_bytes = 2 if bf16 else 4
    weights = params * weight_bytes / (gpus if zero_stage >= 3 else 1)
    gradients = params * weight_bytes / (gpus if zero_stage >= 2 else 1)
    # AdamW: exp_avg + exp_avg_sq in fp32, plus an fp32 master copy when the model weights are bf16.
    optimizer = params * (12 if bf16 else 8) / (gpus if zero_stage >= 1 else 1)
    return {"weights": weights, "gradients": gradients, "optimizer": 0.0 if offload else optimizer,
            "offloaded": optimizer if offload else 0.0}


def plan_stages(experiment: dict[str, Any], config: dict[str, Any], gpus: int,
                text_tokens: int = DEFAULT_TEXT_TOKENS) -> list[StagePlan]:
    params = parameter_count(config)
    resolution = experiment["data"]["resolution"]
    batch = experiment["data"]["batch_size"]
    plans = []
    for stage in experiment["stages"]:
        checkpointing = bool(stage.get("gradient_checkpointing", False))
        act = activation_gib(config, resolution, text_tokens, batch, checkpointing)
        if stage["type"] == "full":
            strategy = stage.get("strategy", "auto")
            ds = stage.get("deepspeed", {}) or {}
            zero = 0 if strategy == "ddp" else int(ds.get("zero_stage", 2))
            bf16 = bool(ds.get("bf16", True)) if zero else True  # DDP on GPU: bf16 autocast over fp32 weights
            offload = bool(ds.get("offload_optimizer", False)) and zero > 0
            if zero:
                sizes = full_stage_bytes(params, gpus, zero, bf16, offload)
                detail = f"DeepSpeed ZeRO-{zero}{' bf16' if bf16 else ''}{' + optimizer offload' if offload else ''}"
            else:
                sizes = full_stage_bytes(params, gpus, 0, False, False)
                detail = "DDP, fp32 weights (bf16 autocast)"
            plan = StagePlan(stage["name"], "full", detail + (", grad. checkpointing" if checkpointing else ""))
            plan.parts = {"weights": sizes["weights"] / GiB, "gradients": sizes["gradients"] / GiB,
                          "optimizer": sizes["optimizer"] / GiB, "activations": act}
            plan.offloaded_gib = sizes["offloaded"] / GiB
        else:
            adapter = stage.get("adapter", {}) or {}
            from fluxtune.default_plugins.adapters import DEFAULT_TARGETS

            targets = adapter.get("targets") or DEFAULT_TARGETS
            rank = int(adapter.get("rank", 64))
            lora = lora_parameter_count(config, targets, rank)
            plan = StagePlan(stage["name"], "lora", f"LoRA rank {rank} ({lora:,} params), DDP, frozen bf16 base"
                             + (", grad. checkpointing" if checkpointing else ""))
            # frozen base in bf16; LoRA weights, gradients and AdamW states in fp32 (4 + 4 + 8 bytes)
            plan.parts = {"weights": params * 2 / GiB, "lora states": lora * 16 / GiB, "activations": act}
        plans.append(plan)
    return plans


def transformer_config(model: dict[str, Any]) -> tuple[dict[str, Any], str, int]:
    """(config, label, text tokens) of the experiment's model, read without loading any weights."""
    if model.get("preset"):
        return presets.TINY_FILL_TRANSFORMER, f"preset {model['preset']}", TEXT_TOKENS[model["preset"]]
    path = os.path.join(model["path"], "transformer", "config.json")
    with open(path) as file:
        return json.load(file), model["path"], DEFAULT_TEXT_TOKENS
