"""Transformer weights written and read one tensor at a time, in diffusers' safetensors layout (single file, or
numbered shards with an index) that `from_pretrained` loads."""

from __future__ import annotations

import json

import pytest
import torch

from fluxtune.canonical import layout, plain_name, save_weights_folder
from fluxtune.flux.weights import INDEX_NAME, WEIGHTS_NAME, read_streamed, save_streamed, weight_files


@pytest.fixture(scope="module")
def transformer():
    from fluxtune.testing import tiny_model

    return tiny_model(seed=2).transformer


@pytest.mark.parametrize("max_shard_bytes, files", [(2**30, 1), (60_000, None)], ids=["one-file", "sharded"])
def test_a_streamed_folder_loads_with_from_pretrained_exactly(transformer, tmp_path, max_shard_bytes, files):
    from diffusers import FluxTransformer2DModel

    state = transformer.state_dict()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    written = save_streamed(tmp_path, entries, iter(state.items()), max_shard_bytes=max_shard_bytes)
    transformer.save_config(tmp_path)
    if files == 1:
        assert [p.name for p in written] == [WEIGHTS_NAME]
    else:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0].endswith("-00001-of-%05d.safetensors" % len(shards))
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in state.items())
    names = list(reversed(state))  # any order, one tensor at a time
    assert all(torch.equal(t, state[n]) for n, t in read_streamed(tmp_path, names))
    assert set(weight_files(tmp_path)) == set(state)
    transformer.save_pretrained(tmp_path / "diffusers")  # the reader also reads what diffusers (safetensors) wrote
    assert all(torch.equal(t, state[n]) for n, t in read_streamed(tmp_path / "diffusers", names))


def test_bf16_tensors_round_trip_through_the_writer(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "c": torch.tensor(2.5)}
    save_streamed(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], tensors.items())
    back = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in tensors.items())


def test_a_tensor_out_of_order_or_of_another_shape_is_refused(transformer, tmp_path):
    state = transformer.state_dict()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    swapped = list(state.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match="expected"):
        save_streamed(tmp_path / "order", entries, swapped)
    with pytest.raises(ValueError, match="expected"):
        save_streamed(tmp_path / "dtype", entries, ((n, t.bfloat16()) for n, t in state.items()))
    with pytest.raises(ValueError, match="more tensors"):
        save_streamed(tmp_path / "extra", entries[:-1], state.items())


def test_an_adapted_model_saves_its_base_weights_under_their_plain_names(transformer, tmp_path):
    from diffusers import FluxTransformer2DModel

    from fluxtune.canonical import LiveWeights
    from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams

    model = FluxTransformer2DModel.from_config(transformer.config)
    model.load_state_dict(transformer.state_dict())
    LoraAdapter(LoraParams(rank=2, targets=["attn.to_q"])).attach(model)
    assert plain_name("blocks.0.attn.to_q.base_layer.weight") == "blocks.0.attn.to_q.weight"
    assert plain_name("blocks.0.attn.to_q.lora_A.default.weight") is None
    assert [n for n, _, _ in layout(model)] == list(transformer.state_dict())
    save_weights_folder(tmp_path, model, LiveWeights(model).tensors())
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in transformer.state_dict().items())
