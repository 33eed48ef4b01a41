"""Stage switches: gradient checkpointing changes memory, not results; LoRA targets are checked against the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxtune.assemble import build_shared, encode_arrays, load_bundle
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams
from fluxtune.registry import registry

SPEC = """
name: gc
base:
  eval_every: 1000
  stages:
    - {{name: full, type: full, steps: 3, gradient_checkpointing: {gc}, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 3, gradient_checkpointing: {gc}, optimizer: {{lr: 1.0e-3}},
       adapter: {{type: lora, rank: 4, alpha: 4, dropout: 0.0}}}}
"""


class Losses:
    def __init__(self):
        self.losses = []

    def log(self, step, metrics):
        self.losses.append(float(metrics["loss"]))

    def evaluation(self, step, metrics):
        pass

    def stage_end(self, step, metrics, checkpoint_dir):
        pass


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    rows = read_rows(sample_jsonl)[:12]
    examples = [load_example(r, 64) for r in rows]
    return {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}


def run(arrays, gc: bool):
    _, base = load_search_text(SPEC.format(gc=str(gc).lower()))
    bundle = load_bundle(base["model"])
    reporter = Losses()
    shared = build_shared(base, encode_arrays(bundle, {k: v[:8] for k, v in arrays.items()}),
                          encode_arrays(bundle, {k: v[8:] for k, v in arrays.items()}), reporter, registry(),
                          torch.device("cpu"))
    return run_cycle(base, bundle.transformer, shared), reporter.losses


def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after(arrays):
    _, plain = run(arrays, gc=False)
    gc_model, checkpointed = run(arrays, gc=True)
    assert len(plain) == 6
    assert np.allclose(plain[:3], checkpointed[:3], rtol=1e-6)  # full stage: bit-for-bit up to recompute order
    # LoRA: B starts at zero, so Adam turns recompute-level gradient noise into lr-sized steps; still the same run
    assert np.allclose(plain[3:], checkpointed[3:], rtol=1e-3)
    assert not gc_model.gradient_checkpointing


def test_unknown_lora_target_fails_with_the_valid_names():
    model = load_bundle({"preset": "tiny-fill"}).transformer
    with pytest.raises(ValueError) as error:
        LoraAdapter(LoraParams(targets=["attn.to_q", "proj_in"])).attach(model)
    message = str(error.value)
    assert "['proj_in']" in message and "attn.to_q" in message.split("valid targets:")[1]
    assert "x_embedder" in message and not any("lora" in n for n, _ in model.named_modules())
