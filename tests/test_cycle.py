"""run_cycle in one process on the tiny FLUX.1-Fill model: it learns, merges, checkpoints and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxtune.checkpoints import Progress, read_progress
from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle

SPEC = """
name: cycle-test
base:
  cycles: {cycles}
  eval_every: 10
  stages:
    - {{name: full, type: full, steps: {full_steps}, optimizer: {{lr: 1.0e-3}}}}
    - name: lora
      type: lora
      steps: {lora_steps}
      optimizer: {{lr: 2.0e-3}}
      adapter: {{type: lora, rank: 8, alpha: 12, dropout: 0.0}}
"""


class ListReporter:
    def __init__(self, keep_checkpoints: Path | None = None):
        self.steps: list[tuple[int, dict]] = []
        self.evaluations: list[tuple[int, dict]] = []
        self.stage_ends: list[tuple[int, dict, dict | None]] = []
        self.keep = keep_checkpoints

    def log(self, step, metrics):
        self.steps.append((step, {k: float(v) for k, v in metrics.items()}))

    def evaluation(self, step, metrics):
        self.evaluations.append((step, metrics))

    def stage_end(self, step, metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir is not None and self.keep is not None:
            import shutil

            kept = self.keep / f"{len(self.stage_ends)}"
            shutil.copytree(checkpoint_dir, kept)
        self.stage_ends.append((step, metrics, kept))


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    rows = read_rows(sample_jsonl)
    examples = [load_example(r, 64) for r in rows]
    out = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    out["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    return out


def prepare_run(arrays, reporter, cycles=1, full_steps=30, lora_steps=30):
    _, base = load_search_text(SPEC.format(cycles=cycles, full_steps=full_steps, lora_steps=lora_steps))
    bundle = load_bundle(base["model"])
    train = encode_arrays(bundle, {k: v[:56] for k, v in arrays.items()})
    val = encode_arrays(bundle, {k: v[56:] for k, v in arrays.items()})
    setup = build_worker_setup(base, train, val, reporter, loaded_components(), torch.device("cpu"))
    return base, bundle, setup


def test_two_cycles_learn_and_report_every_stage(arrays):
    reporter = ListReporter()
    base, bundle, setup = prepare_run(arrays, reporter, cycles=2)
    from fluxtune.context import evaluate

    before = evaluate(bundle.transformer, setup)["val_loss"]
    run_cycle(base, bundle.transformer, setup)
    stages = [(m["cycle"], m["stage"]) for _, m, _ in reporter.stage_ends]
    assert stages == [(0, "full"), (0, "lora"), (1, "full"), (1, "lora")]
    assert [s for s, _, _ in reporter.stage_ends] == [30, 60, 90, 120]
    after = reporter.stage_ends[-1][1]["val_loss"]
    assert after < 0.9 * before, (before, after)
    # per-step losses carry both the global name and the stage/cycle prefix
    assert {"loss", "lora/cycle1/loss"} <= set(reporter.steps[-1][1])
    assert [s for s, _ in reporter.evaluations] == [10, 20, 40, 50, 70, 80, 100, 110]
    # the hand-over time is reported for every stage after the first (its size is a benchmark, not a test)
    assert "transition_s" not in reporter.stage_ends[0][1]
    assert all(m["transition_s"] >= 0.0 for _, m, _ in reporter.stage_ends[1:])


def test_lora_stage_trains_only_the_adapter_then_merges_it(arrays):
    reporter = ListReporter()
    base, bundle, setup = prepare_run(arrays, reporter, full_steps=1, lora_steps=20)
    base["stages"] = base["stages"][1:]  # the LoRA stage alone
    frozen = {n: p.detach().clone() for n, p in bundle.transformer.named_parameters()}
    model = run_cycle(base, bundle.transformer, setup)
    names = {n for n, _ in model.named_parameters()}
    assert names == set(frozen), "merge must leave a plain transformer without LoRA layers"
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])]
    assert changed and all(".attn." in n or ".ff" in n for n in changed)  # only LoRA targets moved
    assert all(p.requires_grad for p in model.parameters())  # ready for the next full stage


def test_merge_keeps_the_adapted_outputs(arrays):
    from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams

    _, bundle, setup = prepare_run(arrays, ListReporter())
    model = bundle.transformer.eval()
    adapter = LoraAdapter(LoraParams(rank=4, alpha=6, dropout=0.0))
    adapter.attach(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained-looking adapter, so merging has something to fold in
        from fluxtune.context import evaluate

        adapted = evaluate(model, setup)["val_loss"]
        merged = adapter.merge(model)
        assert abs(evaluate(merged.eval(), setup)["val_loss"] - adapted) < 1e-5


def test_checkpoints_resume_at_the_next_stage(arrays, tmp_path):
    reporter = ListReporter(keep_checkpoints=tmp_path)
    base, bundle, setup = prepare_run(arrays, reporter, cycles=2, full_steps=5, lora_steps=5)
    run_cycle(base, bundle.transformer, setup)
    second = reporter.stage_ends[1][2]
    assert read_progress(second) == Progress(cycle=1, stage_index=0, global_step=10)
    record = json.loads((second / "progress.json").read_text())
    assert record["finished_stage"] == "lora"
    assert (second / "exports" / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (second / "transformer" / "diffusion_pytorch_model.safetensors").exists()

    from diffusers import FluxTransformer2DModel

    resumed = ListReporter()
    setup.reporter = resumed
    model = FluxTransformer2DModel.from_pretrained(second / "transformer").train()
    run_cycle(base, model, setup, progress=read_progress(second))
    assert [(m["cycle"], m["stage"]) for _, m, _ in resumed.stage_ends] == [(1, "full"), (1, "lora")]
    assert resumed.stage_ends[0][0] == 15


def test_sample_grids_and_the_probe_follow_sample_every(arrays):
    """At the first evaluation, every `sample_every`-th one and every stage end; never in between."""
    reporter = ListReporter()
    base, _, setup = prepare_run(arrays, reporter, full_steps=40, lora_steps=20)  # evaluations at 10, 20, 30, 40(end)…
    base = {**base, "sample_every": 3}
    setup.sample_every = 3
    rendered: list[int] = []

    class CountingPreview:
        def __call__(self, transformer):
            rendered.append(setup.evaluations)  # already counted: 1 for the first evaluation
            return {}

    setup.preview = CountingPreview()
    run_cycle(base, load_bundle(base["model"]).transformer, setup)
    # evaluations (counted from 1): steps 10, 20, 30, the full stage's end (4), step 50, the LoRA stage's
    # pre-merge score (6) and its end (7); the 1st, 4th, 7th… by cadence, stage ends always
    assert rendered == [1, 4, 6, 7]
