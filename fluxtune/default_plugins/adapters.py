"""Built-in adapter: peft LoRA on FluxTransformer2DModel, exported in the diffusers format with its alpha."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

import fluxtune
from fluxtune.api import Params

# diffusers' FLUX LoRA training targets (attention + feed-forward of the double blocks; the single blocks
# share to_q/k/v). There is no `proj_in` in FluxTransformer2DModel (its input layer is `x_embedder`).
DEFAULT_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


KOHYA_FILE = "kohya/lora_comfyui.safetensors"  # relative to the adapter's export folder


class LoraParams(Params):
    rank: int = Field(64, ge=1)
    alpha: float = Field(96.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)


def linear_module_names(model: Any) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_targets(model: Any, targets: list[str]) -> None:
    """peft silently skips unknown names in a mixed list: refuse any target that matches no Linear layer."""
    check_target_names(linear_module_names(model), targets)


def check_target_names(names: list[str], targets: list[str]) -> None:
    """`check_targets` on the Linear module names of a transformer (built, or listed from its config)."""
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        suffixes = sorted({n.split(".", 2)[-1] if n.split(".")[0].endswith("blocks") else n for n in names})
        raise ValueError(
            f"LoRA targets {unknown} match no Linear layer of the transformer; valid targets: {', '.join(suffixes)}")


class LoraAdapter:
    def __init__(self, params: LoraParams):
        self.params = params

    def config(self):
        from peft import LoraConfig

        p = self.params
        return LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=list(p.targets),
                          init_lora_weights=True)

    def attach(self, transformer: Any) -> list[Any]:
        check_targets(transformer, self.params.targets)
        transformer.requires_grad_(False)
        transformer.add_adapter(self.config())
        return [p for p in transformer.parameters() if p.requires_grad]

    def export(self, transformer: Any, out_dir: Path) -> None:
        from diffusers import FluxFillPipeline
        from peft.utils import get_peft_model_state_dict

        out_dir = Path(out_dir)
        state = get_peft_model_state_dict(transformer)
        # Without the metadata diffusers reloads alpha 96 as the rank (scale 1.0 instead of 1.5). Dropout is a
        # training device: with it in the metadata, load_lora_weights would inject layers that drop at inference.
        FluxFillPipeline.save_lora_weights(
            out_dir, transformer_lora_layers=state,
            transformer_lora_adapter_metadata={**self.config().to_dict(), "lora_dropout": 0.0},
        )
        (out_dir / "fluxtune_adapter.json").write_text(json.dumps({"type": "lora", **self.params.model_dump()}))
        self.export_kohya(transformer, state, out_dir / KOHYA_FILE)

    def export_kohya(self, transformer: Any, state: dict[str, Any], path: Path) -> None:
        """The same adapter with kohya/ComfyUI keys (BFL names, fused qkv), in its own folder so that
        `load_lora_weights(out_dir)` finds only the diffusers file."""
        from safetensors.torch import save_file

        from fluxtune.flux.kohya import linear_shapes, peft_to_kohya

        weights = peft_to_kohya({k: v.detach().float().cpu() for k, v in state.items()}, self.params.alpha,
                                linear_shapes(transformer))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path), metadata={
            "ss_network_module": "networks.lora_flux", "ss_network_dim": str(self.params.rank),
            "ss_network_alpha": str(self.params.alpha), "ss_base_model_version": "flux1",
        })

    def take_deltas(self, transformer: Any) -> dict[str, Callable[[], Any]]:
        """Remove the adapter from `transformer` (base weights untouched) and return, per base weight name, a
        function computing the fp32 delta merging adds to it: (B @ A) · alpha/rank, peft's own formula. The
        factors are kept (small); each full-size delta exists only while it is being added."""
        from peft.tuners.lora import LoraLayer

        factors = {}
        for name, module in transformer.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                if module.fan_in_fan_out or module.use_dora.get("default"):
                    raise ValueError(f"{name}: only plain LoRA on Linear layers merges by delta")
                factors[f"{name}.weight"] = (module.lora_B["default"].weight.detach().float().clone(),
                                             module.lora_A["default"].weight.detach().float().clone(),
                                             module.scaling["default"])
        transformer.unload_lora()

        def delta(b: Any, a: Any, scaling: float) -> Callable[[], Any]:
            return lambda: (b @ a) * scaling

        return {name: delta(*f) for name, f in factors.items()}

    def merge(self, transformer: Any) -> Any:
        transformer.fuse_lora()
        transformer.unload_lora()
        transformer.requires_grad_(True)  # merged weights stay frozen otherwise (peft leaves requires_grad False)
        return transformer


@fluxtune.hookimpl
def register_adapters(register):
    register("lora", LoraAdapter, params=LoraParams, doc="peft LoRA (rank, alpha, dropout, target modules)")


@fluxtune.hookimpl
def validate_experiment(experiment, model):
    """Adapter `targets` name Linear layers of this model, at `fluxtune validate` already (listed from its config):
    any adapter's `targets` list, since peft-based ones (this LoRA, plugins' DoRA) all skip unknown names silently."""
    if model is None:  # a registered version that does not name its base: checked when the stage attaches
        return []
    from fluxtune.plan.inventory import linear_layers

    names = [layer.path for layer in linear_layers(model)]
    problems = []
    for stage in experiment["stages"]:
        adapter = stage.get("adapter")
        if isinstance(adapter, dict) and isinstance(adapter.get("targets"), list):
            try:
                check_target_names(names, adapter["targets"])
            except ValueError as exc:
                problems.append((f"stages.{stage['name']}.adapter.targets", str(exc)))
    return problems
