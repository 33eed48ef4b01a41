"""Config dicts for the FLUX.1-Fill models: the real one (for planning) and the tiny random `tiny-fill` preset.

Plain data, no heavy imports: the config layer and memory planners may read these without loading torch.
"""

# Names accepted as `model: {preset: ...}`; the config layer validates against this without importing torch.
PRESET_NAMES = ("tiny-fill",)

# The real FLUX.1-Fill-dev transformer (transformer/config.json), ≈11.9 B parameters. Used only for memory
# planning and layout checks; nothing here builds it.
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

# FLUX.1's scheduler/scheduler_config.json; the tiny preset uses the same, so timestep shifting matches.
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

# Four blocks keep the real 8x downscale and 16 latent channels; 8 channels per block keep it ≈27 k params.
# shift/scaling factors are FLUX.1's, so the latent normalisation code path is the real one.
TINY_FILL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,  # FLUX.1's VAE has no quant convs either
    "use_post_quant_conv": False,
}

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
