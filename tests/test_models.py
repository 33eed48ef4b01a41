"""Registry and promotion on a real sqlite store: a real tiny LoRA adapter registered as a pyfunc model that
inpaints, aliases moved by `fluxtune models`, and a new search starting from `models:/NAME@champion`."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from fluxtune.tracking.registry import register_adapter, resolve_registered_model, versions
from fluxtune.tracking.runs import SweepTracker

MODEL = {"preset": "tiny-fill", "seed": 0, "guidance": 30.0}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Two versions of `inpaint-lora`, each a trained-looking (non-zero) LoRA on the tiny model."""
    from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams
    from fluxtune.flux.model import build_tiny_fill

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = SweepTracker(uri, "models", "sweep-1")
    tracker.start(None, {"fluxtune.version": "0.1.0"}, {"data.cache_key": "abc123"})
    expected = {}
    for version, trial in ((1, "t1"), (2, "t2")):
        transformer = build_tiny_fill(seed=0).transformer
        adapter = LoraAdapter(LoraParams(rank=4, alpha=8.0, dropout=0.0))
        adapter.attach(transformer)
        torch.manual_seed(version)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        adapter.export(transformer, root / trial / "adapter")
        expected[str(version)] = {k: v.detach().clone() for k, v in adapter.merge(transformer).state_dict().items()}
        run = tracker.start_trial(trial, {"model": MODEL}, {})
        tracker.log_metrics(run, {"val_loss": [(20, 0.5 / version)]})
        got = register_adapter(uri, run, "inpaint-lora", "candidate", root / trial / "adapter", None, MODEL,
                               {"sweep": "sweep-1", "trial": trial, "cycle": 0, "stage": "lora", "base_model": "tiny-fill"})
        assert got == str(version)
    return uri, root, expected


def test_new_versions_get_the_candidate_alias_and_lineage_tags(registered):
    uri, _, _ = registered
    listed = versions(uri, "inpaint-lora")
    assert [v["version"] for v in listed] == ["1", "2"]
    assert [v["aliases"] for v in listed] == [[], ["candidate"]]  # the alias moved to the newest
    tags = listed[1]["tags"]
    assert (tags["sweep"], tags["trial"], tags["cycle"], tags["stage"]) == ("sweep-1", "t2", "0", "lora")
    assert tags["data_hash"] == "abc123" and tags["base_model"] == "tiny-fill" and tags["fluxtune_version"] == "0.1.0"
    assert listed[1]["metrics"] == {"val_loss": "0.25"}


def test_promote_moves_an_alias_and_records_who_and_when(registered, tmp_path):
    uri, _, _ = registered
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "USER": "alice", "LOGNAME": "alice", "COLUMNS": "200"}
    promoted = run_cli(["models", "promote", "inpaint-lora", "1", "--alias", "champion"], tmp_path, env)
    assert promoted.returncode == 0, promoted.stderr
    assert "inpaint-lora@champion → version 1" in promoted.stdout
    listed = run_cli(["models", "list", "inpaint-lora"], tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    row_1 = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "champion" in row_1 and "val_loss=0.5" in row_1
    tags = versions(uri, "inpaint-lora")[0]["tags"]
    assert tags["alias.champion.by"] == "alice" and tags["alias.champion.at"].endswith("Z")

    missing = run_cli(["models", "promote", "inpaint-lora", "9"], tmp_path, env)
    assert missing.returncode == 2 and "no version 9" in missing.stderr and "Traceback" not in missing.stderr


def test_the_champion_loads_as_a_pyfunc_model_that_inpaints(registered):
    import mlflow.pyfunc
    import pandas as pd

    from fluxtune.tracking.registry import promote

    uri, _, _ = registered
    promote(uri, "inpaint-lora", "2", "champion")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/inpaint-lora@champion")
    image, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image, "PNG")
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(mask, "PNG")
    frame = pd.DataFrame({"image": [base64.b64encode(image.getvalue()).decode()],
                          "mask": [base64.b64encode(mask.getvalue()).decode()], "prompt": ["a red square"]})
    out = model.predict(frame)
    painted = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert painted.size == (64, 64) and painted.mode == "RGB"


def test_a_new_search_starts_from_a_registered_version(registered, tmp_path):
    import mlflow

    from fluxtune.assemble import load_bundle
    from fluxtune.config.schema import ModelSpec
    from fluxtune.tracking.registry import promote

    uri, _, expected = registered
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # as in a fresh driver: nothing global is `uri`
    promote(uri, "inpaint-lora", "1", "champion")
    spec = ModelSpec(adapter="models:/inpaint-lora@champion").model_dump()
    model = resolve_registered_model(spec, uri, tmp_path)
    assert model["preset"] == "tiny-fill" and model["adapter"].startswith(str(tmp_path))
    transformer = load_bundle(model).transformer
    state = transformer.state_dict()
    assert state.keys() == expected["1"].keys()
    assert all(torch.allclose(state[k], expected["1"][k], atol=1e-5) for k in state)  # version 1, merged
    assert not all(torch.allclose(state[k], expected["2"][k], atol=1e-5) for k in state)  # not version 2
    assert all(p.requires_grad for p in transformer.parameters()) and transformer.training
    # Moving the alias later does not change what this sweep resolved.
    promote(uri, "inpaint-lora", "2", "champion")
    assert resolve_registered_model(spec, uri, tmp_path)["adapter"] != model["adapter"]
    assert os.path.exists(model["adapter"])


def test_a_bad_registered_reference_is_an_input_error(registered, tmp_path):
    from fluxtune.config.errors import InputError

    uri, _, _ = registered
    with pytest.raises(InputError, match="models:/inpaint-lora@nobody not found"):
        resolve_registered_model({"adapter": "models:/inpaint-lora@nobody"}, uri, tmp_path)


def test_runners_up_are_registered_without_moving_an_alias(registered):
    uri, root, _ = registered
    from mlflow import MlflowClient

    before = MlflowClient(uri, registry_uri=uri).get_registered_model("inpaint-lora").aliases
    run = SweepTracker(uri, "models", "sweep-1")
    run.start(None, {}, {})
    version = register_adapter(uri, run.start_trial("t1", {}, {}), "inpaint-lora", None, root / "t1" / "adapter",
                               None, MODEL, {"trial": "t1"})
    assert version == "3" and versions(uri, "inpaint-lora")[-1]["aliases"] == []
    assert MlflowClient(uri, registry_uri=uri).get_registered_model("inpaint-lora").aliases == before


def test_an_adapter_trained_on_a_registered_version_is_registered_with_that_base(registered, tmp_path):
    uri, root, expected = registered
    model = resolve_registered_model({**MODEL, "adapter": "models:/inpaint-lora/1"}, uri, tmp_path)
    run = SweepTracker(uri, "models", "sweep-2")
    run.start(None, {}, {})
    # A lora-only search started from version 1: its adapter's base is version 1 merged, not the plain preset.
    version = register_adapter(uri, run.start_trial("t9", {}, {}), "inpaint-lora", None, root / "t2" / "adapter",
                               None, model, {"trial": "t9"})
    from diffusers import FluxTransformer2DModel

    again = resolve_registered_model({"adapter": f"models:/inpaint-lora/{version}"}, uri, tmp_path)
    base = FluxTransformer2DModel.from_pretrained(Path(again["adapter"]) / "base").state_dict()
    assert all(torch.allclose(base[k], expected["1"][k], atol=1e-5) for k in base)
