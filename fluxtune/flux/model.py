"""Getting a FLUX.1-Fill model: a preset (built here), a local diffusers folder, saving one, encoding prompts.

Everything here works offline: nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fluxtune.flux import presets
from fluxtune.flux.layout import FILL_IN_CHANNELS, FILL_OUT_CHANNELS, check_fill_layout, fill_transformer_config  # noqa: F401


if TYPE_CHECKING:  # diffusers (seconds of imports) is loaded where a transformer, VAE or scheduler is built: a
    # process that encodes prompts needs only transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel


@dataclass
class FluxBundle:
    """The parts of a FLUX.1-Fill pipeline. Text parts are None when a folder ships without them; any part is None
    when it was not asked for (`build_preset(parts=...)`, the latent encoders; a text-only bundle has no
    scheduler)."""

    transformer: FluxTransformer2DModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    text_encoder_2: T5EncoderModel | None
    tokenizer: CLIPTokenizer | None
    tokenizer_2: T5TokenizerFast | None
    scheduler: FlowMatchEulerDiscreteScheduler | None
    source: str  # "preset:tiny-fill(seed=0)" or the folder it was loaded from
    # The "" embedding, computed once by `empty_prompt_embeds` (the text encoders are frozen, so it never changes).
    _empty_prompt: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)


def use_reliable_attention(device: torch.device) -> None:
    """On CUDA, keep PyTorch's attention off the cuDNN backend. With torch 2.11 on an H200, cuDNN's fused attention
    (scaled_dot_product_attention's first choice on Hopper) failed at FLUX shapes: an illegal memory access, or
    "mha_graph.execute ... is_good()", after a few steps; the flash backend runs the same steps (BENCHMARKS.md, GPU
    check). Called by each process before it trains or samples on a GPU."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Only the transformer is fine-tuned here; the VAE and text encoders stay frozen, in eval mode."""
    module.requires_grad_(False)
    return module.eval()


def _tiny_tokenizers(t5_max_length: int = presets.TINY_T5_MAX_LENGTH) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """The real tokenizer classes over in-memory vocabularies (see presets), so nothing is downloaded."""
    clip = CLIPTokenizer(
        vocab=presets.tiny_clip_vocab(), merges=[], model_max_length=presets.TINY_CLIP_MAX_LENGTH
    )
    t5 = T5TokenizerFast(vocab=presets.tiny_t5_vocab(), extra_ids=0, model_max_length=t5_max_length)
    return clip, t5


PRESET_PARTS = ("transformer", "vae", "text")


def build_preset(name: str, seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 parts: tuple[str, ...] = PRESET_PARTS) -> FluxBundle:
    """A preset's FluxBundle (see `presets.PRESETS`): `parts` of transformer, vae, text (others are None).

    Weights are initialised on the CPU in fp32 from `seed` (each part from its own seeded stream, so building
    only some parts gives the same weights), then cast to `dtype` and moved to `device` one tensor at a time: every
    process, whatever its device or dtype, gets the same values (rounded to its dtype). A VAE with shipped weights
    loads them instead. The global RNG state is left untouched. Transformer in train mode, the rest frozen.
    """
    spec = presets.preset(name)
    unknown = set(parts) - set(PRESET_PARTS)
    if unknown:
        raise ValueError(f"unknown preset parts {sorted(unknown)}; parts: {', '.join(PRESET_PARTS)}")
    check_fill_layout(spec.transformer, where=f"the {name} preset")

    def seeded(build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build()
        # torch's own `to`: diffusers' warns that fp32-kept modules (none here) may be cast, whatever the dtype
        return torch.nn.Module.to(module, device=device, dtype=dtype)

    bundle = FluxBundle(transformer=None, vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                        tokenizer_2=None, scheduler=None, source=f"preset:{name}(seed={seed})")
    if set(parts) - {"text"}:
        from diffusers import FlowMatchEulerDiscreteScheduler

        bundle.scheduler = FlowMatchEulerDiscreteScheduler(**presets.FLUX_SCHEDULER)
    if "transformer" in parts:
        from diffusers import FluxTransformer2DModel

        bundle.transformer = seeded(lambda: FluxTransformer2DModel(**spec.transformer)).train()
    if "vae" in parts:
        bundle.vae = _freeze(seeded(lambda: _preset_vae(spec)))
    if "text" in parts:
        bundle.tokenizer, bundle.tokenizer_2 = _tiny_tokenizers(spec.t5_max_length)
        bundle.text_encoder = _freeze(seeded(lambda: CLIPTextModel(CLIPTextConfig(**spec.clip_text))))
        bundle.text_encoder_2 = _freeze(seeded(lambda: T5EncoderModel(T5Config(**spec.t5_encoder))))
    return bundle


def _preset_vae(spec: presets.Preset) -> AutoencoderKL:
    """The preset's AutoencoderKL: random (seeded by the caller), or its shipped weights, checked by hash first."""
    from diffusers import AutoencoderKL

    if spec.vae_weights is None:
        return AutoencoderKL(**spec.vae)
    path = preset_weights_path(spec.vae_weights)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != spec.vae_sha256:
        raise ValueError(f"{path} has sha256 {digest}, expected {spec.vae_sha256} for the {spec.name} VAE")
    with torch.device("meta"):
        vae = AutoencoderKL(**spec.vae)
    vae.load_state_dict(load_file(path), strict=True, assign=True)
    return vae


def preset_weights_path(file_name: str) -> Path:
    return Path(__file__).resolve().parent / "preset_weights" / file_name


def build_tiny_fill(seed: int = 0) -> FluxBundle:
    """The `tiny-fill` preset in fp32 on the CPU (the default model of tests and the demo)."""
    return build_preset("tiny-fill", seed=seed)


def empty_transformer(model: dict) -> FluxTransformer2DModel:
    """The transformer of a model spec (`preset` or `path`) on the meta device: its module names, no weights.

    Cheap even for the real 12 B model, so names (LoRA targets) are checked before Ray starts.
    """
    from diffusers import FluxTransformer2DModel

    if model.get("preset"):
        config = presets.preset(model["preset"]).transformer
    else:
        config = fill_transformer_config(model["path"])
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def load_flux(path: str, torch_dtype: torch.dtype | None = None, transformer_dtype: torch.dtype | None = None,
              transformer_device: torch.device | None = None) -> FluxBundle:
    """Load a local diffusers-layout FLUX.1-Fill folder (transformer/ and vae/ required, text parts optional).

    The transformer's config is checked before any weights are read, so a wrong folder fails in milliseconds.
    `transformer_dtype`/`transformer_device` read the transformer straight into its training dtype and device
    (default `torch_dtype`, the CPU). Models come back as `from_pretrained` leaves them: in eval mode (call
    `.train()` before training).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    path = os.fspath(path)
    fill_transformer_config(path)

    def has(subfolder: str) -> bool:
        return os.path.isdir(os.path.join(path, subfolder))

    local = {"local_files_only": True}
    placement = {"device_map": {"": transformer_device}} if getattr(transformer_device, "type", None) == "cuda" else {}
    transformer = FluxTransformer2DModel.from_pretrained(
        path, subfolder="transformer", torch_dtype=transformer_dtype or torch_dtype, low_cpu_mem_usage=True,
        **placement, **local
    )
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype, **local)
    text_encoder = text_encoder_2 = tokenizer = tokenizer_2 = None
    if has("text_encoder"):
        text_encoder = _freeze(
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch_dtype, **local)
        )
    if has("text_encoder_2"):
        text_encoder_2 = _freeze(
            T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=torch_dtype, **local)
        )
    if has("tokenizer"):
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"), **local)
    if has("tokenizer_2"):
        tokenizer_2 = T5TokenizerFast.from_pretrained(os.path.join(path, "tokenizer_2"), **local)
    if has("scheduler"):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **local)
    else:  # the scheduler is config only; FLUX.1's is the right default
        scheduler = FlowMatchEulerDiscreteScheduler(**presets.FLUX_SCHEDULER)
    return FluxBundle(
        transformer=transformer,
        vae=_freeze(vae),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        source=path,
    )


def save_bundle(bundle: FluxBundle, path: str) -> None:
    """Write the diffusers layout (safetensors + model_index.json) that `load_flux` and
    `FluxFillPipeline.from_pretrained` both read. Missing text parts are recorded as null."""
    from diffusers import FluxFillPipeline  # imported here: only saving needs the pipeline module

    transformer = getattr(bundle.transformer, "module", bundle.transformer)  # DDP/DeepSpeed wrappers hide .config
    pipeline = FluxFillPipeline(
        scheduler=bundle.scheduler,
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        text_encoder_2=bundle.text_encoder_2,
        tokenizer_2=bundle.tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(os.fspath(path), safe_serialization=True)


def _require_text_parts(bundle: FluxBundle) -> None:
    parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    missing = [name for name in parts if getattr(bundle, name) is None]
    if missing:
        raise ValueError(f"cannot encode prompts: the model from {bundle.source} has no {', '.join(missing)}")


@torch.no_grad()
def encode_prompts(
    bundle: FluxBundle, prompts: list[str], max_sequence_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (prompt_embeds [B, L, joint_dim], pooled [B, pooled_dim]), as FluxPipeline.encode_prompt does.

    T5's last hidden state (padded to L = `max_sequence_length`, default the T5 tokenizer's model_max_length;
    FLUX.1-dev uses 512) is the sequence; CLIP's pooled output (padded to 77) is the pooled vector. Like the
    pipeline, no attention mask is passed: the padding tokens are part of what FLUX was trained on.
    """
    _require_text_parts(bundle)
    prompts = list(prompts)
    clip_ids = bundle.tokenizer(
        prompts,
        padding="max_length",
        max_length=bundle.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pooled = bundle.text_encoder(clip_ids.to(bundle.text_encoder.device), output_hidden_states=False).pooler_output
    t5_ids = bundle.tokenizer_2(
        prompts,
        padding="max_length",
        max_length=max_sequence_length or bundle.tokenizer_2.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    prompt_embeds = bundle.text_encoder_2(t5_ids.to(bundle.text_encoder_2.device), output_hidden_states=False)[0]
    return prompt_embeds.to(bundle.text_encoder_2.dtype), pooled.to(bundle.text_encoder.dtype)


def empty_prompt_embeds(bundle: FluxBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """The "" embedding ([1, L, joint_dim], [1, pooled_dim]), computed once per bundle and cached on it.

    Rows without a prompt all share it; treat the returned tensors as read-only (expand, don't edit in place).
    """
    if bundle._empty_prompt is None:
        bundle._empty_prompt = encode_prompts(bundle, [""])
    return bundle._empty_prompt
