"""FLOPs of one training step from the transformer config (no torch): the numerator of MFU.

Model FLOPs, as MFU counts them: every matrix product of the forward and of the backward that training needs, no
recomputation (gradient checkpointing's extra forward is not useful work). A Linear costs 2·in·out per token it
sees forward, as much again for its weight gradient when it trains, and as much for its input gradient when its
input depends on something that trains. Joint attention costs 4·N²·d forward (QKᵀ and AV, N = image + text
tokens) and twice that backward. Tests compare with torch's FlopCounterMode on the built model.
"""

from __future__ import annotations

from typing import Any

from fluxtune.plan.inventory import hidden_size, layer_tokens, linear_layers, segment_of, targeted

TEMB_PREFIXES = ("time_text_embed",)


def training_flops(config: dict[str, Any], image_tokens: int, text_tokens: int, batch: int,
                   targets: list[str] | None = None, rank: int = 0) -> float:
    """Forward + backward FLOPs of a micro-batch: the full stage (targets None: every weight trains) or a LoRA stage
    (rank-`rank` adapters on `targets` over a frozen base)."""
    tokens = {"image": image_tokens, "text": text_tokens, "joint": image_tokens + text_tokens, "sample": 1}
    full = targets is None
    trains = (lambda path: True) if full else (lambda path: targeted(path, targets))
    needs_grad = _input_gradients(config, trains)
    d = hidden_size(config)
    total = 0.0
    for layer in linear_layers(config):
        n = tokens[layer_tokens(layer.path)]
        matmul = 2 * layer.inputs * layer.outputs * n
        total += matmul  # forward
        total += matmul if full else 0  # weight gradient
        total += matmul if needs_grad[layer.path] else 0  # input gradient
        if not full and trains(layer.path):
            adapter = 2 * rank * (layer.inputs + layer.outputs) * n
            total += 2 * adapter + 2 * rank * layer.outputs * n  # forward, weight gradients, gradient into lora_A's output
            total += 2 * rank * layer.inputs * n if needs_grad[layer.path] else 0
    product = 2 * tokens["joint"] ** 2 * d  # one N×N×d matrix product
    for q, k, v in _attention_gradients(config, trains).values():
        # forward QKᵀ and PV; backward dP = dO·Vᵀ (for q or k), dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q as needed
        total += product * (2 + (q or k) + v + q + k)
    return float(total * batch)


def _input_gradients(config: dict[str, Any], trains) -> dict[str, bool]:
    """For each Linear: does its input depend on a trained weight (so backward computes its gradient)?"""
    return _walk(config, trains)[0]


def _attention_gradients(config: dict[str, Any], trains) -> dict[str, tuple[bool, bool, bool]]:
    """For each block: do its attention's (q, k, v) need gradients?"""
    return _walk(config, trains)[1]


def _walk(config: dict[str, Any], trains) -> tuple[dict[str, bool], dict[str, tuple[bool, bool, bool]]]:
    """Follow which streams carry gradient through the network in forward order: the time embedding ("temb", which
    modulates every block), the image and the text tokens (joined in single blocks)."""
    layers = linear_layers(config)
    paths = {layer.path for layer in layers}
    inputs: dict[str, bool] = {}
    attention: dict[str, tuple[bool, bool, bool]] = {}
    temb = any(trains(p) for p in paths if p.startswith(TEMB_PREFIXES))
    for p in paths:
        if p.startswith(TEMB_PREFIXES):  # linear_1 reads data; linear_2 reads linear_1's output
            inputs[p] = p.endswith("linear_2") and trains(p.replace("linear_2", "linear_1"))
    inputs["context_embedder"] = inputs["x_embedder"] = False
    image = trains("x_embedder")
    text = trains("context_embedder")
    for segment in sorted({segment_of(p) for p in paths if segment_of(p).startswith(("double", "single"))},
                          key=lambda s: (s.startswith("single"), int(s.split(".")[1]))):
        kind, index = segment.split(".")
        p = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
        if kind == "double":
            modulation_image = temb or trains(p + "norm1.linear")
            modulation_text = temb or trains(p + "norm1_context.linear")
            inputs[p + "norm1.linear"] = inputs[p + "norm1_context.linear"] = temb
            image_in, text_in = image or modulation_image, text or modulation_text
            for name in ("to_q", "to_k", "to_v"):
                inputs[p + "attn." + name] = image_in
            for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
                inputs[p + "attn." + name] = text_in
            attention[segment] = tuple(image_in or text_in or trains(p + "attn." + a) or trains(p + "attn." + b)
                                       for a, b in (("to_q", "add_q_proj"), ("to_k", "add_k_proj"),
                                                    ("to_v", "add_v_proj")))
            attended = any(attention[segment])
            inputs[p + "attn.to_out.0"] = inputs[p + "attn.to_add_out"] = attended
            image = image_in or attended or trains(p + "attn.to_out.0")
            text = text_in or attended or trains(p + "attn.to_add_out")
            for stream, ff, alive in (("image", "ff", image), ("text", "ff_context", text)):
                inputs[p + ff + ".net.0.proj"] = alive
                inputs[p + ff + ".net.2"] = alive or trains(p + ff + ".net.0.proj")
            image = image or trains(p + "ff.net.0.proj") or trains(p + "ff.net.2")
            text = text or trains(p + "ff_context.net.0.proj") or trains(p + "ff_context.net.2")
        else:
            modulation = temb or trains(p + "norm.linear")
            inputs[p + "norm.linear"] = temb
            joint_in = image or text or modulation
            for name in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"):
                inputs[p + name] = joint_in
            attention[segment] = tuple(joint_in or trains(p + "attn." + n) for n in ("to_q", "to_k", "to_v"))
            attended = any(attention[segment])
            inputs[p + "proj_out"] = attended or trains(p + "proj_mlp")
            image = text = inputs[p + "proj_out"] or trains(p + "proj_out")
    inputs["norm_out.linear"] = temb
    inputs["proj_out"] = image or temb or trains("norm_out.linear")
    return inputs, attention
