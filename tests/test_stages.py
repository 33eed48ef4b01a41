"""Stage switches: gradient checkpointing changes memory, not results; LoRA targets are checked against the model;
a bf16 LoRA stage trains fp32 adapter weights on a bf16 base and merges them exactly into the fp32 weights; the
exported adapter runs without dropout at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fluxtune
from fluxtune.components import loaded_components
from fluxtune.config.load import load_search_text
from fluxtune.cycle import run_cycle
from fluxtune.data.images import load_example
from fluxtune.data.rows import read_rows
from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams
from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle

SPEC = """
name: gc
base:
  eval_every: 1000
  stages:
    - {{name: full, type: full, steps: 3, gradient_checkpointing: {gc}, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 3, gradient_checkpointing: {gc}, optimizer: {{lr: 1.0e-3}},
       adapter: {{type: lora, rank: 4, alpha: 4, dropout: 0.0}}}}
"""


class Losses:
    def __init__(self):
        self.losses = []

    def log(self, step, metrics):
        self.losses.append(float(metrics["loss"]))

    def evaluation(self, step, metrics):
        pass

    def stage_end(self, step, metrics, checkpoint_dir):
        pass


@pytest.fixture(scope="module")
def arrays(sample_jsonl):
    rows = read_rows(sample_jsonl)[:12]
    examples = [load_example(r, 64) for r in rows]
    return {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}


def run(arrays, gc: bool):
    _, base = load_search_text(SPEC.format(gc=str(gc).lower()))
    bundle = load_bundle(base["model"])
    reporter = Losses()
    setup = build_worker_setup(base, encode_arrays(bundle, {k: v[:8] for k, v in arrays.items()}),
                               encode_arrays(bundle, {k: v[8:] for k, v in arrays.items()}), reporter, loaded_components(),
                               torch.device("cpu"))
    return run_cycle(base, bundle.transformer, setup), reporter.losses


def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after(arrays):
    _, plain = run(arrays, gc=False)
    gc_model, checkpointed = run(arrays, gc=True)
    assert len(plain) == 6
    assert np.allclose(plain[:3], checkpointed[:3], rtol=1e-6)  # full stage: bit-for-bit up to recompute order
    # LoRA: B starts at zero, so Adam turns recompute-level gradient noise into lr-sized steps; still the same run
    assert np.allclose(plain[3:], checkpointed[3:], rtol=1e-3)
    assert not gc_model.gradient_checkpointing


def test_unknown_lora_target_fails_with_the_valid_names():
    model = load_bundle({"preset": "tiny-fill"}).transformer
    with pytest.raises(ValueError) as error:
        LoraAdapter(LoraParams(targets=["attn.to_q", "proj_in"])).attach(model)
    message = str(error.value)
    assert "['proj_in']" in message and "attn.to_q" in message.split("valid targets:")[1]
    assert "x_embedder" in message and not any("lora" in n for n, _ in model.named_modules())


BF16_LORA = """
name: bf16-lora
base:
  eval_every: 1000
  callbacks: [{type: dtype_probe}]
  stages:
    - {name: lora, type: lora, steps: 2, precision: bf16, optimizer: {lr: 1.0e-2},
       adapter: {type: lora, rank: 4, alpha: 6, dropout: 0.5, targets: [attn.to_q, attn.to_k, ff.net.2]}}
    - {name: full, type: full, steps: 1, optimizer: {lr: 1.0e-3}}
"""


class DtypeProbe:
    """A callback recording the weights each stage starts from and the dtypes of the base and adapter weights it
    trains with."""

    seen: list[tuple[str, set, set]] = []
    starts: dict[str, dict[str, torch.Tensor]] = {}

    def __init__(self, params):
        pass

    def on_stage_start(self, ctx):
        DtypeProbe.starts[ctx.name] = {n: p.detach().clone() for n, p in ctx.transformer.named_parameters()}

    def on_step_end(self, ctx, step, metrics):
        named = list(ctx.transformer.named_parameters())
        DtypeProbe.seen.append((ctx.name, {p.dtype for n, p in named if "lora_" not in n},
                                {p.dtype for n, p in named if "lora_" in n}))

    @staticmethod
    @fluxtune.hookimpl
    def register_callbacks(register):
        register("dtype_probe", DtypeProbe, doc="test: record weight dtypes")


@pytest.fixture(scope="module")
def bf16_lora_run(arrays, tmp_path_factory):
    from fluxtune.testing import RecordingReporter, registered_plugin

    keep = tmp_path_factory.mktemp("bf16-lora")
    with registered_plugin(DtypeProbe, name="dtype-probe") as components:
        _, base = load_search_text(BF16_LORA, components)
        bundle = load_bundle(base["model"])
        start = {n: p.detach().clone() for n, p in bundle.transformer.named_parameters()}
        reporter = RecordingReporter(keep)
        setup = build_worker_setup(base, encode_arrays(bundle, {k: v[:8] for k, v in arrays.items()}),
                                   encode_arrays(bundle, {k: v[8:] for k, v in arrays.items()}), reporter, components,
                                   torch.device("cpu"))
        run_cycle(base, bundle.transformer, setup)
    return start, reporter.stage_ends[0][2]


def test_bf16_lora_trains_fp32_adapter_weights_on_a_bf16_base_and_merges_exactly_in_fp32(bf16_lora_run):
    from safetensors.torch import load_file

    from fluxtune.flux.weights import read_streamed, weight_files

    start, checkpoint = bf16_lora_run
    assert [(name, base, adapter) for name, base, adapter in DtypeProbe.seen] == [
        ("lora", {torch.bfloat16}, {torch.float32}), ("lora", {torch.bfloat16}, {torch.float32}),
        ("full", {torch.float32}, set())]
    saved = dict(read_streamed(checkpoint / "transformer", list(weight_files(checkpoint / "transformer"))))
    adapter = load_file(str(checkpoint / "exports" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert all(v.dtype == torch.float32 for v in [*saved.values(), *adapter.values()])
    merged = 0
    for name, before in start.items():
        stem = "transformer." + name.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in adapter:
            delta = (adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]) * (6 / 4)
            assert torch.equal(saved[name], before + delta), name  # fp32 base + fp32 delta, bit for bit
            assert not torch.equal(saved[name], (before.bfloat16().float() + delta)), name  # not bf16 base + delta
            merged += 1
        else:
            assert torch.equal(saved[name], before), name
    assert merged == 5  # to_q and to_k of the double and the single block, ff.net.2 of the double block
    # the next (fp32) full stage starts from those exact values, not from the bf16 base's
    assert all(torch.equal(p, saved[n]) for n, p in DtypeProbe.starts["full"].items())


def test_the_exported_lora_has_no_dropout_at_inference(bf16_lora_run):
    import json

    from safetensors import safe_open

    _, checkpoint = bf16_lora_run
    folder = checkpoint / "exports" / "adapter"
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])  # keys prefixed by the component
    assert metadata["transformer.lora_dropout"] == 0.0 and metadata["transformer.lora_alpha"] == 6
    assert json.loads((folder / "fluxtune_adapter.json").read_text())["dropout"] == 0.5  # what it trained with
    model = load_bundle({"preset": "tiny-fill"}).transformer.eval()
    model.load_lora_adapter(str(folder), prefix="transformer", use_safetensors=True)
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)


def test_workers_load_the_model_in_the_first_stages_dtype(tmp_path):
    from fluxtune.cycle import initial_weights_dtype
    from fluxtune.flux.model import build_tiny_fill, save_bundle
    from fluxtune.worker_setup import load_transformer, model_weights_folder

    _, base = load_search_text(SPEC.format(gc="false"))
    assert initial_weights_dtype(base, loaded_components(), "cpu") == torch.float32  # DDP full stage
    assert initial_weights_dtype(base, loaded_components(), "cuda") == torch.bfloat16  # DeepSpeed bf16 full stage
    lora_first = {**base, "stages": base["stages"][1:]}
    assert initial_weights_dtype(lora_first, loaded_components(), "cuda") == torch.bfloat16  # frozen bf16 base
    assert initial_weights_dtype({**lora_first, "stages": [{**lora_first["stages"][0], "precision": "fp32"}]},
                                 loaded_components(), "cuda") == torch.float32

    bundle = build_tiny_fill(seed=3)
    save_bundle(bundle, tmp_path / "model")
    model = {"path": str(tmp_path / "model")}
    loaded = load_transformer(model, torch.bfloat16, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(loaded.parameters(), bundle.transformer.parameters()))
    assert model_weights_folder(model) == str(tmp_path / "model" / "transformer")  # where its exact values stay
    assert model_weights_folder({"preset": "tiny-fill"}) is None
