"""Registry and promotion on a real sqlite store: a real tiny LoRA adapter registered as a pyfunc model that
inpaints, aliases moved by `fluxtune models`, and a new search starting from `models:/NAME@champion`.
A version references its base transformer (a stage checkpoint, with content hashes) instead of copying it, and
says in one line when that base is gone or changed."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli_here
from fluxtune.tracking.model_versions import register_adapter, resolve_registered_model, versions
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


def test_promote_moves_an_alias_and_records_who_and_when(registered, monkeypatch, capsys):
    uri, _, _ = registered
    env = {"MLFLOW_TRACKING_URI": uri, "USER": "alice", "LOGNAME": "alice", "COLUMNS": "200"}
    promoted = run_cli_here(["models", "promote", "inpaint-lora", "1", "--alias", "champion"], monkeypatch, capsys,
                            env)
    assert promoted.returncode == 0, promoted.stderr
    assert "inpaint-lora@champion → version 1" in promoted.stdout
    listed = run_cli_here(["models", "list", "inpaint-lora"], monkeypatch, capsys, env)
    assert listed.returncode == 0, listed.stderr
    row_1 = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "champion" in row_1 and "val_loss=0.5" in row_1
    tags = versions(uri, "inpaint-lora")[0]["tags"]
    assert tags["alias.champion.by"] == "alice" and tags["alias.champion.at"].endswith("Z")

    missing = run_cli_here(["models", "promote", "inpaint-lora", "9"], monkeypatch, capsys, env)
    assert missing.returncode == 2 and "no version 9" in missing.stderr and "Traceback" not in missing.stderr


def test_the_champion_loads_as_a_pyfunc_model_that_inpaints(registered):
    import mlflow.pyfunc
    import pandas as pd

    from fluxtune.tracking.model_versions import promote

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

    from fluxtune.config.schema import ModelSpec
    from fluxtune.tracking.model_versions import promote
    from fluxtune.worker_setup import load_bundle

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


def test_registering_runs_the_input_example_check_without_importing_the_model_stack(registered, tmp_path):
    """MLflow loads the model to check its input example; the sweep's driver must not pay diffusers' (or torch's)
    imports (seconds of CPU per registration) for a check that loads no weights."""
    import subprocess
    import sys

    uri, root, _ = registered
    script = f"""
import shutil, sys
from fluxtune.tracking.model_versions import register_adapter
from fluxtune.tracking.runs import SweepTracker
shutil.copy({str(root / 'mlflow.db')!r}, {str(tmp_path / 'mlflow.db')!r})
uri = {f"sqlite:///{tmp_path / 'mlflow.db'}"!r}
run = SweepTracker(uri, "models", "sweep-1")
run.start(None, {{}}, {{}})
version = register_adapter(uri, run.start_trial("t1", {{}}, {{}}), "inpaint-lora", None,
                           {str(root / 't1' / 'adapter')!r}, None, {MODEL!r}, {{"trial": "t1"}})
print(version, sorted({{name.split(".")[0] for name in sys.modules}} & {{"diffusers", "peft", "torch", "fluxtune"}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "['fluxtune']", done.stdout  # registered, and no diffusers, peft or torch

def test_an_adapter_trained_on_a_registered_version_is_registered_with_that_base(registered, tmp_path):
    from fluxtune.version_contents import read_meta, registered_base

    uri, root, expected = registered
    model = resolve_registered_model({**MODEL, "adapter": "models:/inpaint-lora/1"}, uri, tmp_path)
    run = SweepTracker(uri, "models", "sweep-2")
    run.start(None, {}, {})
    # A lora-only search started from version 1: its adapter's base is version 1 merged, not the plain preset;
    # the new version carries version 1's adapter (small) to merge first, not a copy of the merged base.
    version = register_adapter(uri, run.start_trial("t9", {}, {}), "inpaint-lora", None, root / "t2" / "adapter",
                               None, model, {"trial": "t9"})
    again = resolve_registered_model({"adapter": f"models:/inpaint-lora/{version}"}, uri, tmp_path)
    assert read_meta(again["adapter"])["fused"] == ["fused/0"] and not (Path(again["adapter"]) / "base").exists()
    from fluxtune.flux.model import build_tiny_fill

    base = registered_base(again["adapter"], build_tiny_fill(seed=0).transformer).state_dict()
    assert all(torch.allclose(base[k], expected["1"][k], atol=1e-5) for k in base)


def _perturbed_checkpoint(folder: Path):
    """A stage checkpoint of a tiny transformer that differs from the preset (what a full stage leaves)."""
    from fluxtune.checkpoints import Progress, read_checkpoint_manifest, write_stage_checkpoint
    from fluxtune.flux.model import build_tiny_fill

    transformer = build_tiny_fill(seed=0).transformer
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05)
    write_stage_checkpoint(folder, transformer, Progress(0, 1, 4), "full", None, {"val_loss": 0.4})
    return read_checkpoint_manifest(folder)


def _dropout_adapter(out_dir: Path, base_transformer) -> None:
    """A trained-looking LoRA whose file still says dropout 0.5 (as adapters exported before dropout 0 did)."""
    from diffusers import FluxFillPipeline
    from peft.utils import get_peft_model_state_dict

    from fluxtune.default_plugins.adapters import LoraAdapter, LoraParams

    adapter = LoraAdapter(LoraParams(rank=4, alpha=8.0, dropout=0.5))
    adapter.attach(base_transformer)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in base_transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    FluxFillPipeline.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(base_transformer),
                                       transformer_lora_adapter_metadata=adapter.config().to_dict())


def _frame() -> "pd.DataFrame":
    import pandas as pd

    image, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image, "PNG")
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(mask, "PNG")
    return pd.DataFrame({"image": [base64.b64encode(image.getvalue()).decode()],
                         "mask": [base64.b64encode(mask.getvalue()).decode()]})


@pytest.fixture(scope="module")
def by_reference(registered, tmp_path_factory):
    """A version whose base is a stage checkpoint, referenced (with its hashes) rather than copied."""
    from diffusers import FluxTransformer2DModel

    from fluxtune.version_contents import checkpoint_reference

    uri, _, _ = registered
    root = tmp_path_factory.mktemp("by-reference")
    stage = root / "runs" / "checkpoint_000000"
    manifest = _perturbed_checkpoint(stage)
    _dropout_adapter(root / "adapter", FluxTransformer2DModel.from_pretrained(stage / "transformer"))
    tracker = SweepTracker(uri, "models", "sweep-3")
    tracker.start(None, {}, {})
    run = tracker.start_trial("t5", {}, {})
    tracker.log_metrics(run, {"val_loss": [(8, 0.125)]})
    tracker.end_trial("t5", "FINISHED")
    version = register_adapter(uri, run, "by-reference", "candidate", root / "adapter",
                               checkpoint_reference(str(stage), manifest), MODEL,
                               {"sweep": "sweep-3", "trial": "t5", "search_metric": "val_loss"},
                               description="sweep-3 trial t5: val_loss=0.125")
    return uri, stage, version, run


def _load(uri: str, name: str):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{name}@candidate")


def test_a_version_references_its_base_checkpoint_and_loads_it(by_reference, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri, stage, version, run = by_reference
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("by-reference", version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(
        "by-reference", version), dst_path=str(tmp_path), tracking_uri=uri))
    stored = sorted(p for p in local.rglob("*.safetensors"))
    assert stored and all("adapter" in p.parts for p in stored)  # only the adapter: no copy of the base
    meta = json.loads(next(local.rglob("model.json")).read_text())
    assert meta["base"]["checkpoint"] == str(stage)
    assert meta["base"]["files"]["transformer/diffusion_pytorch_model.safetensors"] == hashlib.sha256(
        (stage / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # Description, signature and input example; lineage tags once each (the metric only as metric.val_loss).
    assert mv.description == "sweep-3 trial t5: val_loss=0.125"
    assert mv.tags["metric.val_loss"] == "0.125" and "val_loss" not in mv.tags and mv.tags["search_metric"] == "val_loss"
    assert mv.tags["base"].startswith(str(stage))
    from mlflow.models import Model

    mlmodel = Model.load(str(local))
    assert [c["name"] for c in mlmodel.signature.inputs.to_dict()] == ["image", "mask", "prompt"]
    assert mlmodel.load_input_example(str(local)).columns.tolist() == ["image", "mask", "prompt"]
    # Registration did not reopen the trial's run for good: it keeps its end.
    assert client.get_run(run).info.status == "FINISHED"

    model = _load(uri, "by-reference")
    transformer = model.unwrap_python_model().pipeline.transformer
    from diffusers import FluxTransformer2DModel

    saved = FluxTransformer2DModel.from_pretrained(stage / "transformer").state_dict()
    state = transformer.state_dict()
    base_keys = [k for k in saved if k in state]  # the LoRA layers wrap some base weights under new names
    assert base_keys and all(torch.equal(state[k], saved[k]) for k in base_keys)


def test_same_input_and_seed_give_the_same_image_whatever_the_global_rng(by_reference):
    uri, _, _, _ = by_reference
    model = _load(uri, "by-reference")
    assert not model.unwrap_python_model().pipeline.transformer.training  # eval after the adapter was loaded
    torch.manual_seed(1)
    first = model.predict(_frame(), params={"steps": 2, "seed": 7})["image"][0]
    torch.manual_seed(2)
    np.random.seed(5)
    second = model.predict(_frame(), params={"steps": 2, "seed": 7})["image"][0]
    assert first == second


def test_a_gone_or_changed_base_is_named_in_one_line(by_reference, tmp_path):
    from fluxtune.config.errors import InputError
    from fluxtune.version_contents import RegisteredBaseError

    uri, stage, version, _ = by_reference
    weights = stage / "transformer" / "diffusion_pytorch_model.safetensors"
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    try:
        with pytest.raises(RegisteredBaseError) as gone:
            _load(uri, "by-reference")
        assert str(gone.value) == (f"the base transformer of this registered version is gone: {weights} no longer "
                                   "exists (its sweep folder was deleted or moved)")
        with pytest.raises(InputError, match="is gone") as refused:  # a search starting from it: before Ray
            resolve_registered_model({"adapter": "models:/by-reference@candidate"}, uri, tmp_path / "sweep")
        assert len(str(refused.value).splitlines()) == 1
    finally:
        moved.rename(weights)
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x40
    weights.write_bytes(bytes(changed))
    try:
        with pytest.raises(RegisteredBaseError) as different:
            _load(uri, "by-reference")
        assert str(different.value) == (f"the base transformer of this registered version has changed: {weights} "
                                        "does not match the sha256 recorded at registration")
    finally:
        weights.write_bytes(original)
    assert _load(uri, "by-reference") is not None
