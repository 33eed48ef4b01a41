"""The `dora` adapter on the tiny FLUX.1-Fill model: trains magnitudes, reloads in diffusers, merges exactly."""

import pytest
import torch

import fluxtune.testing as ft
import fluxtune_dora


def adapter(**params):
    with ft.registered_plugin(fluxtune_dora) as components:
        return components.get("adapter", "dora").build({"type": "dora", **params})


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 384, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([30.0]))


def trained_looking(transformer, dora):
    trainable = dora.attach(transformer)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    return trainable


def test_attach_trains_low_rank_factors_and_magnitudes_only():
    transformer = ft.tiny_model().transformer
    trainable = adapter(rank=4, alpha=8).attach(transformer)
    names = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert len(trainable) == len(names) > 0
    assert any("lora_magnitude_vector" in n for n in names) and all("lora" in n for n in names)


def test_unknown_targets_are_refused():
    with pytest.raises(ValueError, match="proj_in"):
        adapter(targets=["attn.to_q", "proj_in"]).attach(ft.tiny_model().transformer)


def test_export_reloads_in_diffusers_and_merge_keeps_outputs(tmp_path):
    from diffusers import FluxFillPipeline

    dora = adapter(rank=4, alpha=8)
    bundle = ft.tiny_model()
    transformer = bundle.transformer.eval()
    torch.manual_seed(0)
    trained_looking(transformer, dora)
    x = transformer_inputs()
    adapted = transformer(**x).sample
    dora.export(transformer, tmp_path / "adapter")

    fresh = ft.tiny_model().transformer.eval()
    before = fresh(**x).sample
    pipeline = FluxFillPipeline(transformer=fresh, vae=bundle.vae, text_encoder=bundle.text_encoder,
                                text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                tokenizer_2=bundle.tokenizer_2, scheduler=bundle.scheduler)
    pipeline.load_lora_weights(str(tmp_path / "adapter"))
    assert not torch.allclose(before, adapted, atol=1e-4)
    assert torch.allclose(fresh(**x).sample, adapted, atol=1e-5)

    merged = dora.merge(transformer)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.allclose(merged(**x).sample, adapted, atol=1e-5)


def test_lora_stage_with_a_dora_adapter_learns():
    with ft.registered_plugin(fluxtune_dora):
        run = ft.run_tiny("""
            eval_every: 100
            stages: [{name: lora, type: lora, steps: 30, optimizer: {lr: 5.0e-3},
                      adapter: {type: dora, rank: 8, alpha: 8}}]
        """)
    assert run.val_loss < 0.95 * run.initial_val_loss


def test_search_space_fragment_is_merged_into_the_search():
    from fluxtune.config.load import load_search_text

    with ft.registered_plugin(fluxtune_dora) as components:
        spec, _ = load_search_text("""
name: dora-search
base:
  stages: [{name: lora, type: lora, steps: 5, adapter: {type: dora}}]
search:
  include: [dora_rank]
  space: {stages.lora.adapter.alpha: {type: categorical, choices: [8.0]}}
""", components)
    assert spec.search.space["stages.lora.adapter.rank"].choices == [4, 8, 16]
    assert spec.search.space["stages.lora.adapter.alpha"].choices == [8.0]  # the file wins over the fragment
