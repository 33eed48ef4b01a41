"""The masked-region image metric: FluxFillPipeline's sampling on encoded held-out examples, PSNR inside the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline

from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.flux.inpaint import masked_psnr
from fluxtune.flux.model import empty_prompt_embeds
from fluxtune.flux.packing import fill_conditioning, latent_image_ids, pack_mask, text_ids
from fluxtune.flux.preview import ValidationPreview
from fluxtune.flux.sampling import decode_to_uint8, sample_fill_latents, unpack_pixel_mask
from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle


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


def test_unpack_pixel_mask_inverts_pack_mask():
    mask = (torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.equal(unpack_pixel_mask(pack_mask(mask), 64, 48), mask)


def test_sampling_on_encoded_inputs_reproduces_flux_fill_pipeline():
    """Golden: the pipeline's own run (image, mask, fixed latents) vs our loop on the encoded conditioning."""
    bundle = load_bundle({"preset": "tiny-fill"})
    transformer = bundle.transformer.eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator)  # [0, 1], as the pipeline takes tensors
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:40, 20:50] = 1
    noise = torch.randn(1, 16, 64, generator=generator)
    embeds, pooled = empty_prompt_embeds(bundle)
    pipeline = FluxFillPipeline(scheduler=bundle.scheduler, vae=bundle.vae, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    expected = pipeline(image=image, mask_image=mask, latents=noise, prompt_embeds=embeds,
                        pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=3,
                        guidance_scale=30.0, generator=torch.Generator().manual_seed(5), output_type="np").images
    with torch.no_grad():
        cond = fill_conditioning(bundle.vae, image * 2 - 1, mask, generator=torch.Generator().manual_seed(5))
    batch = {"cond": cond, "pooled": pooled, "prompt_embeds": embeds, "txt_ids": text_ids(embeds.shape[1]),
             "img_ids": latent_image_ids(64, 64)}
    latents = sample_fill_latents(transformer, bundle.scheduler, batch, noise, steps=3, guidance=30.0)
    ours = decode_to_uint8(bundle.vae, latents, 64, 64)
    assert np.abs(ours.astype(int) - (expected * 255).round().astype(int)).max() <= 1


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    rows = read_rows(sample_jsonl)[:20]
    examples = [load_example(r, 64) for r in rows]
    out = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    out["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    return out


def test_probe_is_deterministic_and_sees_weight_changes(arrays):
    bundle = load_bundle({"preset": "tiny-fill"})
    val = encode_arrays(bundle, {k: v[16:] for k, v in arrays.items()})
    probe = ValidationPreview.for_worker({"preset": "tiny-fill"}, val, examples=2, steps=2)
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
    setup = build_worker_setup(base, train, val, reporter, loaded_components(), torch.device("cpu"))
    setup.preview = ValidationPreview.for_worker(base["model"], setup.val, examples=2, steps=2)
    run_cycle(base, bundle.transformer, setup)
    assert "masked_psnr" in reporter.evaluations[0] and "masked_psnr" in reporter.ends[0]
