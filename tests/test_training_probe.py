"""The masked-region image metric: a short FluxFillPipeline inpainting of held-out examples, PSNR inside the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxtune.assemble import build_shared, encode_arrays, load_bundle
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.flux.inpaint import InpaintProbe, masked_psnr
from fluxtune.registry import registry


def test_masked_psnr_counts_only_pixels_inside_the_mask():
    target = np.zeros((8, 8, 3), np.uint8)
    result = target.copy()
    result[:4] = 255  # wrong outside the mask only
    mask = np.zeros((8, 8))
    mask[4:, :2] = 1
    assert masked_psnr(result, target, mask) == float("inf")
    result[4:, :2] = 10  # inside: error 10 everywhere
    assert masked_psnr(result, target, mask) == pytest.approx(10 * np.log10(255**2 / 100))
    with pytest.raises(ValueError, match="empty"):
        masked_psnr(result, target, np.zeros((8, 8)))


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    rows = read_rows(sample_jsonl)[:20]
    examples = [load_example(r, 64) for r in rows]
    out = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    out["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    return out


def test_probe_is_deterministic_and_sees_weight_changes(arrays):
    bundle = load_bundle({"preset": "tiny-fill"})
    probe = InpaintProbe(bundle, {k: v[16:] for k, v in arrays.items()}, examples=2, steps=2)
    first = probe(bundle.transformer)["masked_psnr"]
    assert np.isfinite(first) and first == probe(bundle.transformer)["masked_psnr"]
    assert bundle.transformer.training  # restored
    with torch.no_grad():
        bundle.transformer.proj_out.weight.mul_(3.0)
    assert probe(bundle.transformer)["masked_psnr"] != first


def test_cycle_reports_masked_psnr_at_eval_points_and_stage_ends(arrays):
    _, base = load_search_text("""
name: probe
base:
  eval_every: 3
  stages: [{name: full, type: full, steps: 4, optimizer: {lr: 1.0e-3}}]
""")

    class Reporter:
        def __init__(self):
            self.evaluations, self.ends = [], []

        def log(self, step, metrics):
            pass

        def evaluation(self, step, metrics):
            self.evaluations.append(metrics)

        def stage_end(self, step, metrics, checkpoint_dir):
            self.ends.append(metrics)

    bundle = load_bundle(base["model"])
    train = encode_arrays(bundle, {k: v[:16] for k, v in arrays.items()})
    val = encode_arrays(bundle, {k: v[16:] for k, v in arrays.items()})
    reporter = Reporter()
    shared = build_shared(base, train, val, reporter, registry(), torch.device("cpu"))
    shared.probe = InpaintProbe(bundle, {k: v[16:] for k, v in arrays.items()}, examples=2, steps=2)
    run_cycle(base, bundle.transformer, shared)
    assert "masked_psnr" in reporter.evaluations[0] and "masked_psnr" in reporter.ends[0]
