"""Peak memory of one training step per worker: the dtype policy of each strategy, and a walk through the step.

A step holds static state (weights, optimizer states, gradient buffers) throughout. Forward adds each part's
activations (what autograd keeps for backward). Backward visits the parts in reverse: while a part runs, its
activations, its new gradients and the backward's temporaries are alive at once, then its activations are freed.
The optimizer step holds every gradient plus its own temporaries. The plan is the highest of these moments.

Dtype policy (what the stages do): full stage under DeepSpeed ZeRO bf16: bf16 module, bf16 gradients reduced into a
partition, fp32 master weights and optimizer states partitioned; under DDP: fp32 weights, gradients and states,
bf16 autocast on GPU; LoRA stage: frozen base in bf16 on GPU (fp32 on CPU) with fp32 adapter weights, gradients and
states. On the CPU everything but the DeepSpeed bf16 module is fp32 (bf16 is slower there).
"""

from __future__ import annotations

from typing import Any

from fluxtune.plan.inventory import (
    Linear, hidden_size, layer_tokens, linear_layers, norm_parameters, segment_of, segments, targeted,
)

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# Optimizer state bytes per trainable parameter (fp32 parameters): torch AdamW exp_avg + exp_avg_sq; bitsandbytes
# AdamW8bit two uint8 states + a fp32 absmax per 256 values; prodigyopt Prodigy exp_avg, exp_avg_sq, s and p0.
# Adafactor (transformers) factors the second moment of a matrix into a row and a column vector: sized per layer.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 256, "prodigy": 16.0}

# Bytes one block keeps for its backward, per token (image + text) and hidden unit. Measured at real width on the
# CPU (benchmarks/plan_accuracy.py, BENCHMARKS.md). "trained": full stage (weights and the time embedding need
# gradients); "frozen": the LoRA stage's base, before its adapters' own tensors (see `adapter_activations`).
BLOCK_ACTIVATION_BYTES = {
    ("double", "trained", "float32"): 96.4, ("double", "trained", "bfloat16"): 56.4,
    ("single", "trained", "float32"): 88.4, ("single", "trained", "bfloat16"): 52.4,
    ("double", "frozen", "float32"): 48.4, ("double", "frozen", "bfloat16"): 28.4,
    ("single", "frozen", "float32"): 48.4, ("single", "frozen", "bfloat16"): 28.4,
}
# Temporaries on top of what is kept, per token and hidden unit: inside the last block at the end of forward, and
# inside a block's backward (gradients of its activations). Fitted to the whole-model runs of the same benchmark.
FORWARD_TEMPORARY_BYTES = {"float32": 28.0, "bfloat16": 16.0}
BACKWARD_TEMPORARY_BYTES = {"float32": 12.0, "bfloat16": 6.0}
# LoRA dropout keeps, beside the dropped copy of each adapter's input, what backward multiplies by: a bool mask per
# value on GPU (the fused kernel), a float noise tensor of the input's dtype (the adapter's fp32) on the CPU.
DROPOUT_KEEP_BYTES = {"cuda": 1, "cpu": 4}


def activation_bytes_per_token(block: str, weights: str, dtype: str) -> float:
    """BLOCK_ACTIVATION_BYTES for `weights` "full"/"trained" or "lora"/"frozen"."""
    return BLOCK_ACTIVATION_BYTES[(block, "trained" if weights in ("full", "trained") else "frozen", dtype)]


class Step:
    """A training step's memory, built part by part, then walked (see the module docstring)."""

    def __init__(self, config: dict[str, Any], tokens: dict[str, int], batch: int, device: str = "cuda"):
        self.config, self.batch, self.device = config, batch, device
        self.forward_temporary = 0.0  # inside the last block, at the end of forward
        self.tokens = {**tokens, "joint": tokens["image"] + tokens["text"], "sample": 1}
        self.d = hidden_size(config)
        self.static: dict[str, float] = {}  # bytes held throughout
        self.offloaded = 0.0  # optimizer state DeepSpeed keeps in CPU memory instead
        self.activations: dict[str, float] = {name: 0.0 for name in segments(config)}
        self.gradients: dict[str, float] = {name: 0.0 for name in segments(config)}  # produced by backward
        self.temporary: dict[str, float] = {name: 0.0 for name in segments(config)}  # while its backward runs
        self.held_gradients = 0.0  # gradients alive before backward starts (accumulation)
        self.backward_buffers: dict[str, float] = {}  # held from backward until the optimizer step
        self.moments: dict[str, dict[str, float]] = {}  # after backward, in order: what each holds beyond static

    def layers(self) -> list[Linear]:
        return linear_layers(self.config)

    def segment_params(self) -> dict[str, int]:
        params = {name: 0 for name in segments(self.config)}
        for layer in self.layers():
            params[segment_of(layer.path)] += layer.params
        for name in params:
            if name.startswith(("double", "single")):
                params[name] += norm_parameters(self.config, name.split(".")[0])
        return params

    def add_block_activations(self, weights: str, dtype: str, checkpointing: bool) -> None:
        joint = self.tokens["joint"]
        width = DTYPE_BYTES[dtype]
        for name in self.activations:
            if not name.startswith(("double", "single")):
                continue
            full = activation_bytes_per_token(name.split(".")[0], weights, dtype) * joint * self.d * self.batch
            if checkpointing:  # a block keeps its inputs; its backward recomputes the rest, one block at a time
                self.activations[name] += joint * self.d * width * self.batch
                self.temporary[name] += full
            else:
                self.activations[name] += full
            self.temporary[name] += BACKWARD_TEMPORARY_BYTES[dtype] * joint * self.d * self.batch
        self.forward_temporary = FORWARD_TEMPORARY_BYTES[dtype] * joint * self.d * self.batch

    def add_outer_activations(self, trained: bool, dtype: str) -> None:
        """The embedders' inputs (when their weights train), the output head and the loss."""
        width, image = DTYPE_BYTES[dtype], self.tokens["image"] * self.batch
        if trained:
            self.activations["embed"] += (self.config["in_channels"] * image
                                          + self.config["joint_attention_dim"] * self.tokens["text"] * self.batch
                                          ) * width
        out = self.config.get("out_channels") or self.config["in_channels"]
        self.activations["head"] += (3 * self.d * width + 4 * out * 4) * image  # norm, modulation; fp32 loss terms

    def forward_peak(self) -> float:
        """Bytes at the end of forward: static state, every activation, the last block's temporaries."""
        return (sum(self.static.values()) + sum(self.activations.values()) + self.forward_temporary
                + self.held_gradients)

    def walk(self) -> tuple[float, str, dict[str, float]]:
        """(peak bytes, the moment it happens, what is alive then by kind)."""
        static = sum(self.static.values()) + sum(self.backward_buffers.values())
        remaining = sum(self.activations.values())
        done = self.held_gradients
        best = (self.forward_peak(), "forward", {"activations": remaining, "forward temporaries": self.forward_temporary,
                                     "gradients": done})
        for name in reversed(segments(self.config)):
            # A part's backward starts with all its activations and none of its gradients, and ends the other way
            # round; its temporaries (gradients of activations) are alive throughout.
            gradients = self.gradients[name] if not self.held_gradients else 0.0
            start = remaining + done + self.temporary[name]
            end = remaining - self.activations[name] + done + gradients + self.temporary[name]
            if static + max(start, end) > best[0]:
                best = (static + max(start, end), "backward", {
                    "activations": (remaining if start >= end else remaining - self.activations[name])
                    + self.temporary[name], "gradients": done + (0.0 if start >= end else gradients)})
            remaining -= self.activations[name]
            done += gradients
        peak, moment, alive = best
        if moment == "backward":
            alive = {**self.backward_buffers, **alive}
        for name, held in self.moments.items():
            if sum(self.static.values()) + sum(held.values()) > peak:
                peak, moment, alive = sum(self.static.values()) + sum(held.values()), name, held
        return peak, moment, {**self.static, **alive}


def adapter_activations(step: Step, targets: list[str], rank: int, dropout: float, base_dtype: str,
                        checkpointing: bool) -> None:
    """What peft's LoRA layers keep per token: the (dropped-out) input of lora_A and lora_A's output.

    peft casts each adapter's input to the adapter's fp32. Over a bf16 base the stage runs under bf16 autocast, so
    lora_A and lora_B save bf16 casts of their inputs (the fp32 ones are freed); over an fp32 base they save the fp32
    tensors. With dropout every adapter also keeps its mask; without it adapters over an fp32 base share the base's
    input tensor. Inside a checkpointed block they exist only while that block is recomputed.
    """
    shared_inputs: set[tuple[str, int]] = set()
    for layer in step.layers():
        if not targeted(layer.path, targets):
            continue
        tokens = step.tokens[layer_tokens(layer.path)] * step.batch
        saved = DTYPE_BYTES[base_dtype]  # what lora_A and lora_B save of their inputs (autocast over bf16)
        per_token = rank * saved
        if dropout > 0:
            per_token += layer.inputs * (saved + DROPOUT_KEEP_BYTES[step.device])
        elif base_dtype != "float32":
            per_token += layer.inputs * saved
        else:
            source = (segment_of(layer.path), layer.inputs, layer_tokens(layer.path))
            per_token += 0 if source in shared_inputs else layer.inputs * 4
            shared_inputs.add(source)
        segment = segment_of(layer.path)
        kept = step.temporary if checkpointing and segment.startswith(("double", "single")) else step.activations
        kept[segment] += per_token * tokens


def optimizer_state_bytes(name: str, layers: list[Linear], trainable: int, params: dict[str, Any],
                          flat: bool = False) -> float:
    """States of optimizer `name` over fp32 parameters. Adafactor factors each matrix's second moment into a row and
    a column (plus a full one for biases); over a flat 1-D partition (`flat`, DeepSpeed) it keeps a full one."""
    if name == "adafactor":
        second_moment = 4.0 * trainable if flat else sum(4 * (layer.inputs + 2 * layer.outputs) for layer in layers)
        first_moment = 4 * trainable if params.get("beta1") is not None else 0
        return float(second_moment + first_moment)
    return OPTIMIZER_STATE_BYTES[name] * trainable
