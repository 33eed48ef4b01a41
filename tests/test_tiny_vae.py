"""The tiny-fill preset's VAE is legible: fixed weights shipped in the package reconstruct the generated sample data
(median PSNR ≥ 25 dB at 64 px), identically in every process, and a damaged weights file is refused."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.data.sample import ensure_sample_dataset
from fluxtune.flux import presets
from fluxtune.flux.model import _preset_vae, build_preset
from fluxtune.flux.packing import vae_decode, vae_encode


@pytest.fixture(scope="module")
def vae():
    return build_preset("tiny-fill", parts=("vae",)).vae


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """Per image, over uint8 pixel values (inputs in [-1, 1])."""
    to_uint8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = (to_uint8(reconstructed) - to_uint8(original)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse)).numpy()


def test_reconstructs_the_generated_sample_data_above_25_db(vae, tmp_path):
    rows = read_rows(ensure_sample_dataset(n=64, resolution=64, seed=0, cache_dir=tmp_path))
    examples = [load_example(row, 64) for row in rows]
    for key in ("target", "image"):  # what the model is trained to produce, and the source it conditions on
        pixels = torch.from_numpy(np.stack([e[key] for e in examples])).float()
        with torch.no_grad():
            scores = psnr(vae_decode(vae, vae_encode(vae, pixels, sample=False)), pixels)
        assert np.median(scores) >= 25.0, (key, np.median(scores))


def test_latents_are_deterministic_and_near_unit_scale(vae):
    """Sampling the posterior (as FluxFillPipeline does) gives the mode; normalised latents are O(1)."""
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mode = vae_encode(vae, pixels, sample=False)
        sampled = vae_encode(vae, pixels, generator=torch.Generator().manual_seed(0), sample=True)
    assert torch.allclose(mode, sampled, atol=1e-4)
    assert 0.3 < mode.std().item() < 3.0 and abs(mode.mean().item()) < 1.0


def state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def two_worker_check(folder, sample_jsonl):
    """For tests/two_workers.py: the VAE's digest in other processes (each worker of the shared run)."""
    return vae_digest_here, {}


def vae_digest_here(config: dict, rank: int, world: int) -> dict:
    torch.manual_seed(1234 + rank)  # a process whose global RNG is elsewhere
    return {"digest": state_digest(build_preset("tiny-fill", seed=3, parts=("vae",)).vae)}


def test_every_process_gets_the_same_bytes(vae, two_train_workers):
    from two_workers import records_of

    again = build_preset("tiny-fill", seed=7, parts=("vae",)).vae  # the seed does not touch shipped weights
    assert state_digest(again) == state_digest(vae)
    assert [record["digest"] for record in records_of(two_train_workers, "test_tiny_vae")] == [state_digest(vae)] * 2


def test_a_weights_file_that_is_not_the_shipped_one_is_refused():
    spec = dataclasses.replace(presets.preset("tiny-fill"), vae_sha256="0" * 64)
    with pytest.raises(ValueError, match="tiny_fill_vae.safetensors has sha256 .*, expected 0000"):
        _preset_vae(spec)
