"""Adapter `dora`: DoRA (LoRA plus a learned per-output magnitude, Liu et al. 2024) through peft.

diffusers' `add_adapter` takes the peft config as is; the export is diffusers' LoRA format with the adapter
metadata (so `FluxFillPipeline.load_lora_weights` restores `use_dora` and alpha), and merging folds both the
low-rank update and the magnitude into the base weights. Also registers the search-space fragment
`dora_rank` for `search.include`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

import fluxtune

__version__ = "0.1.0"

# Attention projections of the double and single blocks (FluxTransformer2DModel has no `proj_in`).
DEFAULT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class DoraParams(fluxtune.Params):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)


class DoraAdapter:
    def __init__(self, params: DoraParams):
        self.params = params

    def config(self):
        from peft import LoraConfig

        p = self.params
        return LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=list(p.targets),
                          use_dora=True, init_lora_weights=True)

    def attach(self, transformer: Any) -> list[Any]:
        import torch

        # peft skips unknown names in a mixed target list without a word: refuse them here instead.
        linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        unknown = [t for t in self.params.targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if unknown:
            raise ValueError(f"DoRA targets {unknown} match no Linear layer of the transformer")
        transformer.requires_grad_(False)
        transformer.add_adapter(self.config())
        return [p for p in transformer.parameters() if p.requires_grad]

    def export(self, transformer: Any, out_dir: Path) -> None:
        from diffusers import FluxFillPipeline
        from peft.utils import get_peft_model_state_dict

        out_dir = Path(out_dir)
        FluxFillPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                           transformer_lora_adapter_metadata=self.config().to_dict())
        (out_dir / "fluxtune_adapter.json").write_text(json.dumps({"type": "dora", **self.params.model_dump()}))

    def merge(self, transformer: Any) -> Any:
        transformer.fuse_lora()
        transformer.unload_lora()
        transformer.requires_grad_(True)  # peft leaves the merged base frozen
        return transformer


@fluxtune.hookimpl
def register_adapters(register):
    register("dora", DoraAdapter, params=DoraParams, doc="peft DoRA: LoRA + learned magnitude (rank, alpha, dropout)")


@fluxtune.hookimpl
def register_search_spaces(register):
    register("dora_rank", lambda params: {
        "stages.lora.adapter.rank": {"type": "categorical", "choices": [4, 8, 16]},
        "stages.lora.adapter.alpha": {"type": "float", "low": 4.0, "high": 32.0, "log": True},
    }, doc="DoRA rank and alpha of the stage named `lora`")
