"""LoRA weights in the kohya / ComfyUI layout (BFL module names, `lora_unet_…` keys, fused qkv).

The reference is diffusers' `_convert_kohya_flux_lora_to_diffusers`, which this inverts: the BFL checkpoint fuses
q/k/v (and, in single blocks, q/k/v/mlp) into one Linear, so their LoRAs are stacked into one of rank k·r with a
block-diagonal up matrix. A part the adapter does not target gets a zero block, so every fused LoRA stays exactly
block-diagonal and loaders split it back without mixing parts. Scales travel as kohya's per-module `.alpha`.
"""

from __future__ import annotations

import torch

DOUBLE = {  # diffusers suffix under transformer_blocks.{i} -> BFL name under double_blocks_{i}
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
}
# diffusers loads these two without alpha, so their scale is baked into lora_up; the adaLN output's halves are
# (scale, shift) in BFL order and (shift, scale) in diffusers'.
FINAL = {"proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}


def _pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft state dict -> {module path: (A [r, in], B [out, r])}."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            modules[name] = (state[key], state[f"{name}.lora_B.weight"])
    return modules


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def peft_to_kohya(state: dict[str, torch.Tensor], alpha: float,
                  shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """peft LoRA weights of a FluxTransformer2DModel -> kohya/ComfyUI keys.

    `alpha` is the adapter's lora_alpha (scale alpha/r per module); `shapes` maps each Linear's module path to its
    (out_features, in_features), needed for the zero blocks of untargeted parts of a fused layer.
    """
    modules = _pairs(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(key: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float | None) -> None:
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        if module_alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(module_alpha))

    def single(kohya: str, path: str) -> None:
        if path in modules:
            down, up = modules[path]
            put(kohya, down, up, alpha)
            used.add(path)

    def fused(kohya: str, paths: tuple[str, ...]) -> None:
        present = [p for p in paths if p in modules]
        if not present:
            return
        rank = modules[present[0]][0].shape[0]
        downs, ups = [], []
        for path in paths:
            out_features, in_features = shapes[path]
            down, up = modules.get(path, (None, None))
            if down is None:  # untargeted part: a zero LoRA keeps the up matrix block-diagonal
                reference = modules[present[0]][0]
                down = reference.new_zeros(rank, in_features)
                up = reference.new_zeros(out_features, rank)
            downs.append(down)
            ups.append(up)
            used.add(path)
        # kohya scales by alpha / (fused rank): k parts of rank r need alpha k·alpha for the same alpha / r
        put(kohya, torch.cat(downs, dim=0), torch.block_diag(*ups), alpha * len(paths))

    blocks = sorted({int(p.split(".")[1]) for p in modules if p.startswith("transformer_blocks.")})
    for i in blocks:
        for suffix, name in DOUBLE.items():
            single(f"lora_unet_double_blocks_{i}_{name}", f"transformer_blocks.{i}.{suffix}")
        for name, parts in DOUBLE_FUSED.items():
            fused(f"lora_unet_double_blocks_{i}_{name}", tuple(f"transformer_blocks.{i}.{p}" for p in parts))
    blocks = sorted({int(p.split(".")[1]) for p in modules if p.startswith("single_transformer_blocks.")})
    for i in blocks:
        for suffix, name in SINGLE.items():
            single(f"lora_unet_single_blocks_{i}_{name}", f"single_transformer_blocks.{i}.{suffix}")
        for name, parts in SINGLE_FUSED.items():
            fused(f"lora_unet_single_blocks_{i}_{name}", tuple(f"single_transformer_blocks.{i}.{p}" for p in parts))
    for path, name in TOP_LEVEL.items():
        single(f"lora_unet_{name}", path)
    for path, name in FINAL.items():
        if path in modules:
            down, up = modules[path]
            up = up * (alpha / down.shape[0])
            put(f"lora_unet_{name}", down, _swap_halves(up) if path == "norm_out.linear" else up, None)
            used.add(path)
    unknown = sorted(set(modules) - used)
    if unknown:
        raise ValueError(f"no kohya/ComfyUI name for LoRA modules {unknown}")
    return out


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Each Linear's (out_features, in_features) by module path (peft's base_layer unwrapped)."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name.removesuffix(".base_layer")] = (module.out_features, module.in_features)
    return shapes
