"""Every Linear of FluxTransformer2DModel from its config: exact parameter and LoRA counts, and the block structure
(which tokens each layer sees, which block it belongs to) that memory and FLOPs planning walk. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Linear:
    path: str
    inputs: int
    outputs: int

    @property
    def params(self) -> int:
        return self.inputs * self.outputs + self.outputs  # every Linear of the FLUX transformer has a bias


def hidden_size(config: dict[str, Any]) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def linear_layers(config: dict[str, Any]) -> list[Linear]:
    """Every nn.Linear of FluxTransformer2DModel(**config), by module path, in forward order."""
    d = hidden_size(config)
    out: list[Linear] = [
        Linear("time_text_embed.timestep_embedder.linear_1", 256, d),
        Linear("time_text_embed.timestep_embedder.linear_2", d, d),
    ]
    if config.get("guidance_embeds"):
        out += [Linear("time_text_embed.guidance_embedder.linear_1", 256, d),
                Linear("time_text_embed.guidance_embedder.linear_2", d, d)]
    out += [
        Linear("time_text_embed.text_embedder.linear_1", config["pooled_projection_dim"], d),
        Linear("time_text_embed.text_embedder.linear_2", d, d),
        Linear("context_embedder", config["joint_attention_dim"], d),
        Linear("x_embedder", config["in_channels"], d),
    ]
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}"
        out += [Linear(f"{p}.norm1.linear", d, 6 * d), Linear(f"{p}.norm1_context.linear", d, 6 * d)]
        out += [Linear(f"{p}.attn.{n}", d, d) for n in
                ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        out += [Linear(f"{p}.ff.net.0.proj", d, 4 * d), Linear(f"{p}.ff.net.2", 4 * d, d),
                Linear(f"{p}.ff_context.net.0.proj", d, 4 * d), Linear(f"{p}.ff_context.net.2", 4 * d, d)]
    for i in range(config["num_single_layers"]):
        p = f"single_transformer_blocks.{i}"
        out += [Linear(f"{p}.norm.linear", d, 3 * d), Linear(f"{p}.proj_mlp", d, 4 * d)]
        out += [Linear(f"{p}.attn.{n}", d, d) for n in ("to_q", "to_k", "to_v")]
        out += [Linear(f"{p}.proj_out", 5 * d, d)]
    out += [Linear("norm_out.linear", d, 2 * d),
            Linear("proj_out", d, config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"]))]
    return out


def norm_parameters(config: dict[str, Any], block: str) -> int:
    """The RMSNorm weights of q and k (and of the added q/k in double blocks) of one block."""
    return config["attention_head_dim"] * (4 if block == "double" else 2)


def parameter_count(config: dict[str, Any]) -> int:
    """Exact parameter count: the Linears plus the RMSNorm weights of q/k (double blocks: 4, single: 2)."""
    norms = (norm_parameters(config, "double") * config["num_layers"]
             + norm_parameters(config, "single") * config["num_single_layers"])
    return sum(layer.params for layer in linear_layers(config)) + norms


def targeted(path: str, targets: list[str]) -> bool:
    """peft's rule: a target names a module exactly or ends its path after a dot."""
    return any(path == t or path.endswith("." + t) for t in targets)


def lora_parameter_count(config: dict[str, Any], targets: list[str], rank: int) -> int:
    """LoRA A and B of every targeted Linear."""
    return sum(rank * (layer.inputs + layer.outputs) for layer in linear_layers(config) if targeted(layer.path, targets))


def layer_tokens(path: str) -> str:
    """Which tokens a Linear processes: "image", "text", "joint" (single blocks), or "sample" (one vector per sample:
    the time/guidance/pooled embedders and the adaptive norms' modulation)."""
    if path.startswith("time_text_embed") or path.endswith("norm1.linear") or path.endswith("norm1_context.linear") \
            or path.endswith("norm.linear") or path == "norm_out.linear":
        return "sample"
    if path == "context_embedder" or ".add_" in path or path.endswith("to_add_out") or ".ff_context." in path:
        return "text"
    if path.startswith("single_transformer_blocks"):
        return "joint"
    return "image"


def segment_of(path: str) -> str:
    """The part of the network a Linear belongs to: "embed", "double.<i>", "single.<i>" or "head"."""
    if path.startswith("transformer_blocks."):
        return "double." + path.split(".")[1]
    if path.startswith("single_transformer_blocks."):
        return "single." + path.split(".")[1]
    if path.startswith("norm_out") or path == "proj_out":
        return "head"
    return "embed"


def segments(config: dict[str, Any]) -> list[str]:
    """The network's parts in forward order (backward visits them reversed)."""
    return (["embed"] + [f"double.{i}" for i in range(config["num_layers"])]
            + [f"single.{i}" for i in range(config["num_single_layers"])] + ["head"])
