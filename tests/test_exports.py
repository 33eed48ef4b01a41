"""A LoRA stage's exports load back where people use them: diffusers' FluxFillPipeline.load_lora_weights
(with alpha metadata) and the kohya/ComfyUI key layout (checked with diffusers' own kohya converter)."""

from __future__ import annotations

import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from PIL import Image
from safetensors.torch import load_file

from fluxtune.default_plugins.adapters import KOHYA_FILE, LoraAdapter, LoraParams
from fluxtune.flux.inpaint import fill_pipeline, inpaint
from fluxtune.flux.kohya import peft_to_kohya
from fluxtune.flux.model import build_tiny_fill
from fluxtune.flux.packing import latent_image_ids, text_ids

ALL_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear", "x_embedder"]


def trained_adapter(targets, rank=4, alpha=6.0, seed=0):
    """A tiny transformer with a LoRA whose B matrices are non-zero, as after training."""
    bundle = build_tiny_fill(seed=0)
    adapter = LoraAdapter(LoraParams(rank=rank, alpha=alpha, dropout=0.0, targets=targets))
    adapter.attach(bundle.transformer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bundle.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return bundle, adapter


def transformer_output(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, tokens, 384, generator=generator), timestep=torch.tensor([0.4]),
                     guidance=torch.tensor([30.0]), pooled_projections=torch.randn(1, 32, generator=generator),
                     encoder_hidden_states=torch.randn(1, text, 32, generator=generator),
                     txt_ids=text_ids(text), img_ids=latent_image_ids(64, 64), return_dict=False)[0]


def fresh_pipeline():
    bundle = build_tiny_fill(seed=0)
    return bundle, fill_pipeline(bundle, bundle.transformer.eval())


def test_diffusers_export_reproduces_the_trained_model_in_flux_fill_pipeline(tmp_path):
    bundle, adapter = trained_adapter(ALL_TARGETS, rank=4, alpha=6.0)
    trained = bundle.transformer.eval()
    adapter.export(trained, tmp_path)
    base_bundle, pipeline = fresh_pipeline()
    before = transformer_output(pipeline.transformer)
    pipeline.load_lora_weights(tmp_path)  # the folder: diffusers must pick its own file, not the kohya one
    expected = transformer_output(trained)
    assert not torch.allclose(before, expected, atol=1e-3)
    assert torch.allclose(transformer_output(pipeline.transformer), expected, atol=1e-5)

    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .byte().numpy())
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    reloaded = inpaint(base_bundle, pipeline, [image], [mask], steps=2)[0]
    direct = inpaint(bundle, fill_pipeline(bundle, trained), [image], [mask], steps=2)[0]
    assert abs(reloaded.astype(int) - direct.astype(int)).max() <= 1


def test_kohya_export_loads_in_diffusers_kohya_path_with_the_same_outputs(tmp_path):
    # diffusers' kohya converter hard-codes FLUX.1's single-block widths (3072/12288), so on the tiny model only
    # double-block layers can go through it end to end; the next test covers single blocks at real widths.
    targets = [f"transformer_blocks.0.{t}" for t in ALL_TARGETS[:12]] + ["transformer_blocks.0.norm1.linear"]
    bundle, adapter = trained_adapter(targets, rank=4, alpha=6.0)
    trained = bundle.transformer.eval()
    adapter.export(trained, tmp_path)
    keys = load_file(tmp_path / KOHYA_FILE)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)  # 3 × rank 4
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 18.0
    _, pipeline = fresh_pipeline()
    pipeline.load_lora_weights(tmp_path / "kohya", weight_name="lora_comfyui.safetensors")
    assert torch.allclose(transformer_output(pipeline.transformer), transformer_output(trained), atol=1e-5)


def test_kohya_keys_round_trip_at_real_flux_widths_including_single_blocks():
    """Synthetic LoRA weights for one double and one single block of the real model (3072 wide)."""
    inner, mlp, rank, alpha = 3072, 12288, 4, 6.0
    generator = torch.Generator().manual_seed(0)
    shapes = {f"transformer_blocks.0.{t}": (inner, inner) for t in
              ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out")}
    shapes.update({"transformer_blocks.0.ff.net.0.proj": (mlp, inner), "transformer_blocks.0.ff.net.2": (inner, mlp)})
    shapes.update({f"single_transformer_blocks.0.{t}": (inner, inner) for t in ("attn.to_q", "attn.to_k", "attn.to_v")})
    shapes["single_transformer_blocks.0.proj_mlp"] = (mlp, inner)
    shapes["single_transformer_blocks.0.proj_out"] = (inner, inner + mlp)
    shapes["norm_out.linear"] = (2 * inner, inner)
    targeted = [p for p in shapes if not p.endswith("attn.add_v_proj")]  # one fused part left out on purpose
    state = {}
    for path in targeted:
        out_features, in_features = shapes[path]
        state[f"{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    kohya = peft_to_kohya(state, alpha, shapes)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for path in shapes:
        x = torch.randn(shapes[path][1], generator=generator)
        prefix = "" if path == "norm_out.linear" else "transformer."  # diffusers' converter leaves the final layer bare
        a, b = back[f"{prefix}{path}.lora_A.weight"], back[f"{prefix}{path}.lora_B.weight"]
        got = b @ (a @ x)
        if path in targeted:
            want = (alpha / rank) * state[f"{path}.lora_B.weight"] @ (state[f"{path}.lora_A.weight"] @ x)
        else:
            want = torch.zeros(shapes[path][0])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3), path
