"""The models fluxtune can build without a download (presets), and the real FLUX.1-Fill-dev config for planning.

Plain data, no heavy imports: the config layer and the memory planner read these without loading torch.
A preset is one `Preset` entry in `PRESETS`; every other module asks `preset(name)` for its parts.

* `tiny-fill`: the real Fill channel layout around 1 double + 1 single block of width 32 (≈92 k parameters) and a
  small VAE with fixed, fitted weights shipped in the package (it encodes and decodes images: sample grids are
  legible). The default: every test and the demo run on it.
* `proxy-fill`, `proxy-fill-4`, `proxy-fill-8`: FLUX.1-Fill-dev's real widths (3072 = 24 heads × 128, text 4096 and
  pooled 768, RoPE [16, 56, 56]) with 2, 4 or 8 blocks (half double, half single: ≈0.54, 1.0, 2.0 B parameters)
  and FLUX.1's real VAE architecture, all randomly initialised; text encoders with the real output widths but one
  narrow layer. For measuring step time, memory and MFU at real width without the 24 GB checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The real FLUX.1-Fill-dev transformer (transformer/config.json), ≈11.9 B parameters. Used for memory planning,
# layout checks and as the template of the proxies; nothing builds it whole.
FLUX_FILL_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 384,  # 64 noisy + 64 masked-image + 256 mask channels, all packed 2x2
    "out_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_FILL_DEV_TRANSFORMER_PARAMS = 11_902_391_360
FLUX_TEXT_TOKENS = 512  # FLUX.1-dev's T5 sequence length (max_sequence_length)

# FLUX.1's vae/config.json (AutoencoderKL, ≈84 M parameters): the proxies build it with random weights.
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

# FLUX.1's scheduler/scheduler_config.json; every preset uses it, so timestep shifting matches.
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# tiny-fill: the real Fill channel layout (384 in, 64 out, patch 1) around 1 double + 1 single block. ≈92 k params.
TINY_FILL_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # = T5 d_model
    "pooled_projection_dim": 32,  # = CLIP hidden size
    "guidance_embeds": True,
    "axes_dims_rope": [4, 4, 8],  # must sum to attention_head_dim
}

# Four blocks keep the real 8x downscale and 16 latent channels; narrow blocks keep it small and fast. Its weights
# are not random: they are fitted to reconstruct images (scripts/fit_tiny_vae.py) and shipped with the package.
# shift/scaling factors are FLUX.1's, so the latent normalisation code path is the real one.
TINY_FILL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,  # FLUX.1's VAE has no quant convs either
    "use_post_quant_conv": False,
}
TINY_FILL_VAE_WEIGHTS = "tiny_fill_vae.safetensors"  # in fluxtune/flux/preset_weights/
# Of that file: checked on load (a stale or damaged file must not silently encode).
TINY_FILL_VAE_SHA256 = "7561c00f41a337be4983ce02cadcceec7b1487d982d32268bea213a118f0a4d5"

# The tiny tokenizers know printable ASCII only (anything else becomes the unknown token): enough to
# exercise the real tokenizer classes without any downloaded vocabulary.
PRINTABLE_ASCII = [chr(code) for code in range(33, 127)]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
TINY_CLIP_MAX_LENGTH = 77  # the pipeline pads CLIP prompts to tokenizer.model_max_length
TINY_T5_MAX_LENGTH = 32


def tiny_clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocab: every character alone and as a word end (`</w>`), then CLIP's two specials last."""
    tokens = PRINTABLE_ASCII + [char + "</w>" for char in PRINTABLE_ASCII] + [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """Unigram vocab in T5's order (<pad>=0, </s>=1, <unk>=2), then the word-start marker and characters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    return specials + [(char, -3.0) for char in PRINTABLE_ASCII]


_CLIP_VOCAB_SIZE = len(tiny_clip_vocab())

TINY_CLIP_TEXT = {
    "vocab_size": _CLIP_VOCAB_SIZE,
    "hidden_size": 32,  # its pooled output feeds pooled_projection_dim
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": TINY_CLIP_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    # CLIPTextModel pools at the first eos id in the sequence, so these must match the tokenizer.
    "bos_token_id": _CLIP_VOCAB_SIZE - 2,
    "eos_token_id": _CLIP_VOCAB_SIZE - 1,
    "pad_token_id": _CLIP_VOCAB_SIZE - 1,
}

TINY_T5_ENCODER = {
    "vocab_size": len(tiny_t5_vocab()),
    "d_model": 32,  # its last hidden state feeds joint_attention_dim
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",  # as in T5 v1.1 (FLUX's text_encoder_2)
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

# The proxies' text encoders: the real output widths (T5 4096 per token, CLIP pooled 768) from one narrow layer,
# and FLUX.1-dev's 512 T5 tokens, so the transformer sees real-shaped conditioning.
PROXY_CLIP_TEXT = {**TINY_CLIP_TEXT, "hidden_size": 768, "projection_dim": 768, "num_attention_heads": 2}
PROXY_T5_ENCODER = {**TINY_T5_ENCODER, "d_model": 4096}


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one preset's FluxBundle: the configs of its parts and where fixed weights live."""

    name: str
    doc: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_text: dict[str, Any]
    t5_encoder: dict[str, Any]
    t5_max_length: int
    vae_weights: str | None = None  # a file in fluxtune/flux/preset_weights/ (None: random, seeded like the rest)
    vae_sha256: str | None = None


def _proxy(blocks: int) -> Preset:
    double = single = blocks // 2
    return Preset(
        name="proxy-fill" if blocks == 2 else f"proxy-fill-{blocks}",
        doc=f"FLUX.1-Fill-dev's widths, {double} double + {single} single blocks, real VAE architecture; random",
        transformer={**FLUX_FILL_DEV_TRANSFORMER, "num_layers": double, "num_single_layers": single},
        vae=FLUX_VAE, clip_text=PROXY_CLIP_TEXT, t5_encoder=PROXY_T5_ENCODER, t5_max_length=FLUX_TEXT_TOKENS,
    )


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("tiny-fill", "the real Fill layout at width 32 (≈92 k params) with a fitted, shipped tiny VAE",
               TINY_FILL_TRANSFORMER, TINY_FILL_VAE, TINY_CLIP_TEXT, TINY_T5_ENCODER, TINY_T5_MAX_LENGTH,
               vae_weights=TINY_FILL_VAE_WEIGHTS, vae_sha256=TINY_FILL_VAE_SHA256),
        _proxy(2), _proxy(4), _proxy(8),
    )
}
# Names accepted as `model: {preset: ...}`; the config layer validates against this without importing torch.
PRESET_NAMES = tuple(PRESETS)


def preset(name: str) -> Preset:
    """The preset called `name`; ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESET_NAMES)}") from None
