"""Masked SSIM: how alike the fill and the target look inside the mask (structure, contrast, brightness)."""

from __future__ import annotations

import numpy as np
import pytest

from fluxtune.config.errors import InputError
from fluxtune.config.load import load_search_text
from fluxtune.flux.inpaint import masked_psnr, masked_ssim
from fluxtune.flux.preview import ValidationPreview


def _mask(height=32, width=32):
    mask = np.zeros((height, width))
    mask[8:20, 10:22] = 1
    return mask


def test_identical_fills_score_one_and_worse_fills_score_less():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert masked_ssim(target, target, _mask()) == pytest.approx(1.0)
    noisy = np.clip(target + rng.normal(0, 20, target.shape), 0, 255).astype(np.uint8)
    very_noisy = np.clip(target + rng.normal(0, 60, target.shape), 0, 255).astype(np.uint8)
    assert 1.0 > masked_ssim(noisy, target, _mask()) > masked_ssim(very_noisy, target, _mask()) > -1.0


def test_flat_images_score_by_the_brightness_term_alone():
    """Two flat images: no variance, so SSIM is the luminance term (2ab + C1) / (a² + b² + C1) exactly."""
    a, b = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    result, target = np.full((32, 32, 3), a, np.uint8), np.full((32, 32, 3), b, np.uint8)
    assert masked_ssim(result, target, _mask()) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_changes_far_outside_the_mask_do_not_count():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = target.copy()
    result[26:, :] = 0  # 6 px below the mask: outside every 7-px window centred inside it
    assert masked_ssim(result, target, _mask()) == pytest.approx(1.0)
    assert masked_psnr(result, target, _mask()) == float("inf")


def test_an_empty_mask_is_refused_like_masked_psnr():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        masked_ssim(image, image, np.zeros((32, 32)))


def test_the_probe_reports_ssim_beside_psnr_and_skips_empty_masks(sample_jsonl):
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.worker_setup import encode_arrays, load_bundle

    rows = read_rows(sample_jsonl)[:2]
    examples = [load_example(r, 64) for r in rows]
    arrays = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    arrays["prompt"] = np.array(["", ""], dtype=object)
    bundle = load_bundle({"preset": "tiny-fill"})
    probe = ValidationPreview.for_worker({"preset": "tiny-fill"}, encode_arrays(bundle, arrays), examples=2, steps=2)
    scores = probe(bundle.transformer)
    assert set(scores) == {"masked_psnr", "masked_ssim"} and -1.0 <= scores["masked_ssim"] <= 1.0
    probe.masks[0][:] = False  # one example with nothing to inpaint: scored on the other alone
    only_second = probe(bundle.transformer)
    assert np.isfinite(only_second["masked_ssim"]) and only_second["masked_ssim"] != scores["masked_ssim"]
    probe.masks[1][:] = False
    assert probe(bundle.transformer) == {}  # nothing to score: no metric rather than a made-up one


SEARCH = """
name: ssim
base:
  sample_every: {every}
  stages: [{{name: full, type: full, steps: 4, optimizer: {{lr: 1.0e-3}}}}]
search: {{metric: masked_ssim, mode: max}}
"""


def test_masked_ssim_is_a_search_metric_measured_at_every_evaluation():
    spec, _ = load_search_text(SEARCH.format(every=1), path="ssim.yaml")
    assert spec.search.metric == "masked_ssim"
    with pytest.raises(InputError, match="sample_every: 1"):
        load_search_text(SEARCH.format(every=2), path="ssim.yaml")
