"""fluxtune.flux.packing: the Fill input layout, checked against FluxFillPipeline's own code."""

import pytest
import torch
from diffusers import FluxFillPipeline

from fluxtune.flux.model import build_tiny_fill, encode_prompts
from fluxtune.flux.packing import (
    check_resolution,
    fill_conditioning,
    latent_image_ids,
    pack_latents,
    pack_mask,
    text_ids,
    transformer_inputs,
    unpack_latents,
    vae_decode,
    vae_encode,
    vae_scale_factor,
)


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_fill(seed=0)


@pytest.fixture(scope="module")
def pipeline(bundle):
    # Built from the tiny parts directly: no hub, no downloads.
    return FluxFillPipeline(
        scheduler=bundle.scheduler,
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        text_encoder_2=bundle.text_encoder_2,
        tokenizer_2=bundle.tokenizer_2,
        transformer=bundle.transformer,
    )


def image_and_mask(batch=2, height=64, width=48, seed=0):
    """An image in [-1, 1] and a {0, 1} mask whose edge does not follow the 8x8 blocks."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    mask = torch.zeros(batch, 1, height, width)
    mask[:, :, 5:37, 11:30] = 1
    return image, mask


def test_pack_then_unpack_is_identity():
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(unpack_latents(packed, height=64, width=48), latents)


def test_pack_latents_puts_a_2x2_patch_in_one_token_channel_major():
    latents = torch.zeros(1, 16, 4, 4)
    latents[0, 3, 2, 1] = 1.0  # channel 3, row 2, column 1: token (1, 0), patch offset (0, 1)
    packed = pack_latents(latents)
    assert packed.nonzero().tolist() == [[0, 1 * 2 + 0, 3 * 4 + 0 * 2 + 1]]


def test_pack_mask_shape_and_where_one_pixel_lands():
    mask = torch.zeros(1, 1, 32, 48)
    row, column = 19, 42  # latent cell (2, 5), offset (3, 2) inside its 8x8 block
    mask[0, 0, row, column] = 1.0
    packed = pack_mask(mask)
    assert packed.shape == (1, (32 // 16) * (48 // 16), 256)
    block_channel = (row % 8) * 8 + column % 8
    cell_row, cell_column = row // 8, column // 8
    token = (cell_row // 2) * (48 // 16) + cell_column // 2
    channel = block_channel * 4 + (cell_row % 2) * 2 + cell_column % 2
    assert packed.nonzero().tolist() == [[0, token, channel]]


def test_pack_mask_keeps_binary_values_and_their_count():
    _, mask = image_and_mask()
    packed = pack_mask(mask)
    assert set(packed.unique().tolist()) == {0.0, 1.0}
    assert packed.sum() == mask.sum()
    assert torch.equal(pack_mask(torch.ones(1, 1, 32, 32)), torch.ones(1, 4, 256))


def test_sizes_that_are_not_multiples_of_16_are_refused():
    check_resolution(64, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_mask(torch.zeros(1, 1, 40, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_image_ids(64, 56)


def test_position_ids_shapes():
    ids = latent_image_ids(64, 48)
    assert ids.shape == (4 * 3, 3)
    assert ids[:, 0].eq(0).all()
    assert ids[-1].tolist() == [0.0, 3.0, 2.0]  # last token: row 3, column 2
    assert torch.equal(text_ids(7), torch.zeros(7, 3))


def test_vae_round_trip_shapes_and_mean_is_deterministic(bundle):
    image, _ = image_and_mask()
    assert vae_scale_factor(bundle.vae) == 8
    with torch.no_grad():
        latents = vae_encode(bundle.vae, image, sample=False)
        assert latents.shape == (2, 16, 8, 6)
        assert torch.equal(latents, vae_encode(bundle.vae, image, sample=False))
        assert vae_decode(bundle.vae, latents).shape == image.shape


def test_transformer_inputs_are_noisy_first_and_checked():
    noisy, conditioning = torch.randn(2, 12, 64), torch.randn(2, 12, 320)
    hidden = transformer_inputs(noisy, conditioning)
    assert hidden.shape == (2, 12, 384)
    assert torch.equal(hidden[..., :64], noisy)
    with pytest.raises(ValueError, match="token count"):
        transformer_inputs(noisy, conditioning[:, :6])


# --- golden tests: the pipeline's own helpers on the same tensors ------------------------------------------


def test_pack_unpack_and_ids_match_the_pipeline(pipeline):
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 64, 48), pipeline._unpack_latents(packed, 64, 48, 8))
    assert torch.equal(latent_image_ids(64, 48), pipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_fill_conditioning_matches_prepare_mask_latents(pipeline, bundle):
    image, mask = image_and_mask()
    with torch.no_grad():
        packed_mask, masked_image_latents = pipeline.prepare_mask_latents(
            mask,
            image * (1 - mask),
            batch_size=2,
            num_channels_latents=16,
            num_images_per_prompt=1,
            height=64,
            width=48,
            dtype=torch.float32,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(7),
        )
        ours = fill_conditioning(bundle.vae, image, mask, generator=torch.Generator().manual_seed(7))
    assert ours.shape == (2, 12, 320)
    assert torch.equal(ours, torch.cat((masked_image_latents, packed_mask), dim=-1))
    assert torch.equal(pack_mask(mask), packed_mask)


def test_transformer_sees_exactly_what_the_pipeline_feeds_it(pipeline, bundle):
    """Run the pipeline for one step and capture the transformer's inputs; rebuild them with our functions."""
    image, mask = image_and_mask(batch=1, height=64, width=64)
    noisy = torch.randn(1, 16, 64)
    prompt_embeds, pooled = encode_prompts(bundle, ["a red door"])
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)

    handle = bundle.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipeline(
            image=(image + 1) / 2,  # the pipeline takes [0, 1] tensors and normalises them to [-1, 1]
            mask_image=mask,
            latents=noisy,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            height=64,
            width=64,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        )
    finally:
        handle.remove()

    with torch.no_grad():
        conditioning = fill_conditioning(bundle.vae, image, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(captured["hidden_states"], transformer_inputs(noisy, conditioning))
    assert torch.equal(captured["img_ids"], latent_image_ids(64, 64))
    assert torch.equal(captured["txt_ids"], text_ids(prompt_embeds.shape[1]))
    assert 0.0 < captured["timestep"].item() <= 1.0  # the model scales by 1000 itself
    # training feeds the guidance embedding the pipeline's default guidance_scale (model.guidance, default 30)
    from fluxtune.config.schema import ModelSpec

    assert torch.equal(captured["guidance"], torch.full((1,), ModelSpec(preset="tiny-fill").guidance))
