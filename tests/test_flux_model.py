"""fluxtune.flux.model: presets (tiny-fill, the real-width proxies), local loading/saving, prompt encoding."""

import json
import re

import pytest
import torch
from diffusers import FluxFillPipeline, FluxTransformer2DModel

from fluxtune.flux import presets
from fluxtune.flux.model import (
    build_preset,
    build_tiny_fill,
    check_fill_layout,
    empty_transformer,
    empty_prompt_embeds,
    encode_prompts,
    load_flux,
    save_bundle,
)
from fluxtune.flux.packing import latent_image_ids, text_ids


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_fill(seed=0)


@pytest.fixture(scope="module")
def saved_dir(bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-fill")
    save_bundle(bundle, path)
    return path


def transformer_output(bundle, batch=2, height=64, width=64):
    """One deterministic forward pass on the 384-channel Fill input."""
    generator = torch.Generator().manual_seed(0)
    tokens = (height // 16) * (width // 16)
    prompt_embeds, pooled = encode_prompts(bundle, ["a cat"] * batch)
    with torch.no_grad():
        return bundle.transformer(
            hidden_states=torch.randn(batch, tokens, 384, generator=generator),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=torch.full((batch,), 0.5),
            img_ids=latent_image_ids(height, width),
            txt_ids=text_ids(prompt_embeds.shape[1]),
            guidance=torch.full((batch,), 30.0),
            return_dict=False,
        )[0]


def test_tiny_fill_has_the_real_fill_layout_and_about_92k_params(bundle):
    config = bundle.transformer.config
    assert (config.patch_size, config.in_channels, config.out_channels) == (1, 384, 64)
    assert 85_000 < sum(p.numel() for p in bundle.transformer.parameters()) < 100_000
    assert sum(p.numel() for p in bundle.vae.parameters()) < 400_000  # small and fitted (see test_tiny_vae.py)
    assert bundle.vae.config.latent_channels == 16
    assert (bundle.vae.config.shift_factor, bundle.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.scheduler.config.use_dynamic_shifting and bundle.scheduler.config.shift == 3.0
    assert bundle.source == "preset:tiny-fill(seed=0)"


def test_tiny_fill_trains_the_transformer_only(bundle):
    assert bundle.transformer.training
    assert all(p.requires_grad for p in bundle.transformer.parameters())
    for frozen in (bundle.vae, bundle.text_encoder, bundle.text_encoder_2):
        assert not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second, other = build_tiny_fill(seed=1), build_tiny_fill(seed=1), build_tiny_fill(seed=2)
    assert torch.equal(torch.rand(1), expected_next)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    weight = "x_embedder.weight"
    assert not torch.equal(first.transformer.state_dict()[weight], other.transformer.state_dict()[weight])


def test_forward_on_384_channels_gives_64_channel_tokens(bundle):
    assert transformer_output(bundle).shape == (2, 16, 64)


def test_real_fill_dev_config_is_a_fill_layout_of_11_9b_params():
    check_fill_layout(presets.FLUX_FILL_DEV_TRANSFORMER)
    with torch.device("meta"):  # no memory: just count
        model = FluxTransformer2DModel(**presets.FLUX_FILL_DEV_TRANSFORMER)
    assert sum(p.numel() for p in model.parameters()) == presets.FLUX_FILL_DEV_TRANSFORMER_PARAMS


def test_check_fill_layout_rejects_a_text_to_image_flux():
    with pytest.raises(ValueError, match="in_channels 64"):
        check_fill_layout({"patch_size": 1, "in_channels": 64, "out_channels": None}, where="/m/transformer")


def test_encode_prompts_shapes_and_empty_prompt_is_deterministic(bundle):
    prompt_embeds, pooled = encode_prompts(bundle, ["a cat", "", "Ünïcode ☃ is unknown but fine"])
    assert prompt_embeds.shape == (3, presets.TINY_T5_MAX_LENGTH, 32)
    assert pooled.shape == (3, 32)
    empty, empty_pooled = empty_prompt_embeds(bundle)
    assert empty.shape == (1, presets.TINY_T5_MAX_LENGTH, 32)
    assert torch.equal(empty[0], prompt_embeds[1]) and torch.equal(empty_pooled[0], pooled[1])
    assert empty_prompt_embeds(bundle)[0] is empty  # cached, computed once
    fresh_empty, _ = encode_prompts(build_tiny_fill(seed=0), [""])
    assert torch.equal(fresh_empty, empty)


def test_encode_prompts_matches_the_pipeline(bundle):
    pipeline = FluxFillPipeline(
        scheduler=bundle.scheduler,
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        text_encoder_2=bundle.text_encoder_2,
        tokenizer_2=bundle.tokenizer_2,
        transformer=bundle.transformer,
    )
    prompts = ["a red door", ""]
    with torch.no_grad():
        expected, expected_pooled, _ = pipeline.encode_prompt(
            prompts, prompt_2=None, max_sequence_length=presets.TINY_T5_MAX_LENGTH
        )
    prompt_embeds, pooled = encode_prompts(bundle, prompts)
    assert torch.equal(prompt_embeds, expected) and torch.equal(pooled, expected_pooled)


def test_save_then_load_gives_identical_outputs(bundle, saved_dir):
    loaded = load_flux(str(saved_dir))
    assert loaded.source == str(saved_dir)
    assert json.loads((saved_dir / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    assert (saved_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert torch.equal(transformer_output(loaded), transformer_output(bundle))
    assert torch.equal(encode_prompts(loaded, ["a cat"])[1], encode_prompts(bundle, ["a cat"])[1])
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.scheduler.config.base_shift == 0.5
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.vae.encode(image).latent_dist.mean, bundle.vae.encode(image).latent_dist.mean)


def test_saved_folder_loads_as_a_fill_pipeline(saved_dir):
    pipeline = FluxFillPipeline.from_pretrained(saved_dir)
    assert pipeline.transformer.config.in_channels == 384
    assert pipeline.tokenizer_2 is not None


def test_text_parts_are_optional(bundle, tmp_path):
    no_text = build_tiny_fill(seed=0)
    no_text.text_encoder = no_text.text_encoder_2 = no_text.tokenizer = no_text.tokenizer_2 = None
    save_bundle(no_text, tmp_path)
    loaded = load_flux(str(tmp_path))
    assert loaded.text_encoder is None and loaded.tokenizer_2 is None
    with pytest.raises(ValueError, match="no text_encoder"):
        empty_prompt_embeds(loaded)


def test_load_flux_refuses_a_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_flux(str(missing))


def test_load_flux_refuses_a_transformer_that_is_not_fill(tmp_path):
    text_to_image = FluxTransformer2DModel(**{**presets.TINY_FILL_TRANSFORMER, "in_channels": 64, "out_channels": None})
    text_to_image.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/transformer is not a FLUX.1-Fill transformer")):
        load_flux(str(tmp_path))


def test_fill_pipeline_runs_two_steps_on_the_tiny_bundle(bundle):
    """The layout is real: diffusers' own inference loop runs on it end to end."""
    pipeline = FluxFillPipeline(
        scheduler=bundle.scheduler,
        vae=bundle.vae,
        text_encoder=None,  # prompt embeddings are passed, so the text parts are not needed
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=bundle.transformer,
    )
    prompt_embeds, pooled = empty_prompt_embeds(bundle)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    images = pipeline(
        image=torch.rand(1, 3, 64, 64),
        mask_image=mask,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name, double, single, billions", [("proxy-fill", 1, 1, 0.547), ("proxy-fill-4", 2, 2, 1.028),
                                                             ("proxy-fill-8", 4, 4, 1.991)])
def test_proxies_have_flux_fill_devs_widths(name, double, single, billions):
    transformer = empty_transformer({"preset": name})  # meta device: no memory
    config = transformer.config
    assert (config.num_layers, config.num_single_layers) == (double, single)
    for key in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"):
        assert config[key] == presets.FLUX_FILL_DEV_TRANSFORMER[key], key
    assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)


def test_proxy_vae_is_flux1s_architecture_and_text_has_the_real_widths():
    bundle = build_preset("proxy-fill", parts=("vae", "text"))
    assert bundle.transformer is None
    assert {k: bundle.vae.config[k] for k in presets.FLUX_VAE} == presets.FLUX_VAE
    assert sum(p.numel() for p in bundle.vae.parameters()) == 83_819_683  # FLUX.1's VAE
    prompt_embeds, pooled = encode_prompts(bundle, ["a red door"])
    assert prompt_embeds.shape == (1, 512, 4096) and pooled.shape == (1, 768)
    assert sum(p.numel() for p in bundle.text_encoder_2.parameters()) < 5_000_000  # narrow: one small layer


def test_a_preset_built_in_bf16_or_in_parts_has_the_same_weights():
    whole = build_preset("tiny-fill", seed=3)
    half = build_preset("tiny-fill", seed=3, dtype=torch.bfloat16, device="cpu", parts=("transformer",))
    assert half.vae is None and half.text_encoder is None
    assert all(p.dtype == torch.bfloat16 for p in half.transformer.parameters()) and half.transformer.training
    for (name, a), b in zip(whole.transformer.state_dict().items(), half.transformer.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    alone = build_preset("tiny-fill", seed=3, parts=("text",))
    for a, b in zip(whole.text_encoder_2.parameters(), alone.text_encoder_2.parameters()):
        assert torch.equal(a, b)


def test_unknown_preset_or_part_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown model preset 'tiny'; presets: tiny-fill, proxy-fill, proxy-fill-4"):
        build_preset("tiny")
    with pytest.raises(ValueError, match="unknown preset parts"):
        build_preset("tiny-fill", parts=("unet",))
