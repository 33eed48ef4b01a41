"""The MLflow run tree, in-process on a real sqlite store: what a sweep leaves for people to browse."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtune.tracking.runs import CHECKPOINT_TAG, SweepTracker, flatten
from fluxtune.tracking.samples import SAMPLES_KEY, SampleGrids, decode_samples, encode_samples, flux_sigmas
from fluxtune.tracking.store import tracking_uri


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One real sqlite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def exp(request) -> str:
    return request.node.name


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _result(step: int, losses: dict[int, float], **extra) -> dict:
    return {"global_step": step, "val_loss": 1.0 / step, "fluxtune_steps": json.dumps({"loss": [[s, v] for s, v in losses.items()]}),
            "training_iteration": 1, **extra}


def test_the_default_store_lives_under_mlflow_and_the_env_var_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("FLUXTUNE_MLFLOW_DIR", str(tmp_path / "store"))
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(None) == "http://127.0.0.1:1"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # the YAML's wins over both


def test_a_sweep_is_a_parent_run_with_one_child_per_trial(uri, exp, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: s\n")
    tracker = SweepTracker(uri, exp, "s-1")
    parent = tracker.start(str(spec), {"fluxtune.version": "0.1.0", "fluxtune.plugin.fluxtune": "builtin"},
                           {"search": {"metric": "val_loss"}})
    child = tracker.start_trial("t1", {"stages": [{"name": "lora", "adapter": {"rank": 8}}]}, {})
    c = tracker.client
    assert c.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert c.get_run(child).data.params == {"stages.lora.adapter.rank": "8"}
    assert c.get_run(parent).data.tags["fluxtune.plugin.fluxtune"] == "builtin"
    assert [a.path for a in c.list_artifacts(parent)] == ["sweep.yaml"]
    assert c.get_experiment(tracker.experiment_id).name == exp


def test_results_become_step_metrics_and_system_metrics(uri, exp):
    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    run = tracker.start_trial("t1", {}, {})
    tracker.log_result("t1", _result(4, {0: 1.0, 1: 0.9, 2: 0.8, 3: 0.7}), "global_step", "fluxtune_steps")
    c = tracker.client
    assert [(m.step, m.value) for m in c.get_metric_history(run, "loss")] == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    assert [(m.step, m.value) for m in c.get_metric_history(run, "val_loss")] == [(4, 0.25)]
    assert "training_iteration" not in c.get_run(run).data.metrics  # Tune bookkeeping stays out
    assert 0 <= c.get_run(run).data.metrics["system/cpu_utilization_percentage"] <= 100


def test_a_resumed_sweep_writes_to_the_same_runs_without_duplicates(uri, exp):
    first = SweepTracker(uri, exp, "s-1")
    parent = first.start(None, {}, {"base": {"seed": 0}})
    run = first.start_trial("t1", {"seed": 0}, {})
    first.log_result("t1", _result(3, {0: 1.0, 1: 0.9, 2: 0.8}), "global_step", "fluxtune_steps")

    # A new driver process (resume): same sweep name → same parent; same trial id → same child.
    again = SweepTracker(uri, exp, "s-1")
    assert again.start(None, {}, {"base": {"seed": 0}}) == parent
    assert again.start_trial("t1", {"seed": 0}, {}) == run
    # The restarted trial replays steps 1..2 from its last stage checkpoint, then goes on.
    again.log_result("t1", _result(5, {1: 0.95, 2: 0.85, 3: 0.7, 4: 0.6}), "global_step", "fluxtune_steps")
    c = again.client
    assert [m.step for m in c.get_metric_history(run, "loss")] == [0, 1, 2, 3, 4]
    runs = c.search_runs([again.experiment_id])
    assert len(runs) == 2
    assert c.get_run(run).info.status == "RUNNING"
    assert c.get_run(parent).data.params == {"base.seed": "0"}  # logged once (re-logging would not change it)


def test_sample_grids_and_stage_checkpoints_reach_the_trial_run(uri, exp, tmp_path):
    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    run = tracker.start_trial("t1", {}, {})
    paths = tracker.log_samples("t1", encode_samples([_png((255, 0, 0)), _png((0, 255, 0))]), 40)
    assert paths == ["samples/step-000040.png", "samples/step-000040-1.png"]

    checkpoint = tmp_path / "checkpoint_000"
    (checkpoint / "transformer").mkdir(parents=True)
    (checkpoint / "transformer" / "config.json").write_text("{}")
    (checkpoint / "exports" / "adapter").mkdir(parents=True)
    (checkpoint / "exports" / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    tracker.log_stage("t1", str(checkpoint), 0, "lora")
    tracker.log_result("t1", _result(4, {0: 1.0, 1: 0.5}), "global_step", "fluxtune_steps")
    tracker.log_loss_curves("t1")

    c = tracker.client
    listed = {a.path for a in c.list_artifacts(run)}
    assert {"samples", "stages", "loss_curves.png", "images"} <= listed
    red = Image.open(c.download_artifacts(run, "samples/step-000040.png", str(tmp_path)))
    assert red.getpixel((0, 0)) == (255, 0, 0)
    assert [a.path for a in c.list_artifacts(run, "stages/cycle0-lora/adapter")] == [
        "stages/cycle0-lora/adapter/pytorch_lora_weights.safetensors"]
    assert tracker.stage_checkpoints("t1") == [(0, "lora", str(checkpoint))]  # what a resumed driver reads back
    # The full transformer is referenced, not uploaded (GBs for the real model) ...
    assert c.get_run(run).data.tags[CHECKPOINT_TAG + "cycle0-lora"] == checkpoint.as_uri()
    assert not c.list_artifacts(run, "stages/cycle0-lora/transformer")
    # ... unless the YAML asks.
    tracker.upload_checkpoints = True
    tracker.log_stage("t1", str(checkpoint), 1, "full")
    assert c.list_artifacts(run, "stages/cycle1-full/transformer")


def test_sample_grids_are_rendered_from_encoded_validation_examples():
    from fluxtune.flux.encoded import ValidationSet, encode_examples
    from fluxtune.flux.model import build_tiny_fill

    bundle = build_tiny_fill(seed=0)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (3, 3, 64, 48)).astype("float32")
    mask = np.zeros((3, 1, 64, 48), "float32")
    mask[:, :, 16:40, 8:24] = 1
    val = ValidationSet.build(encode_examples(bundle, image, mask, image, [None, "a cat", None]), seed=1)
    delivered: list[bytes] = []
    grids = SampleGrids.for_worker({"preset": "tiny-fill", "seed": 0, "guidance": 30.0}, val, delivered.append)
    transformer = bundle.transformer.train()
    png = grids.render(transformer)
    assert delivered == [png] and transformer.training  # train mode restored
    grid = Image.open(io.BytesIO(png))
    assert grid.size == (4 * 48, 3 * 64)  # source | mask | prediction | target, one row per example
    assert decode_samples(json.loads(json.dumps({SAMPLES_KEY: encode_samples([png])}))[SAMPLES_KEY]) == [png]
    # The mask panel is the exact pixel mask, unpacked from its 256 packed channels.
    assert np.array_equal(np.asarray(grid)[:64, 48:96, 0] > 127, mask[0, 0] > 0.5)
    # The prediction depends on the weights.
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05)
    assert grids.render(transformer) != png


def test_flux_sigmas_match_the_pipeline_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxtune.flux.presets import FLUX_SCHEDULER
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    assert np.allclose(flux_sigmas(8, 1024), scheduler.sigmas.numpy(), atol=1e-6)


def test_flatten_keys_stages_by_name_like_search_paths():
    tree = {"cycles": 2, "stages": [{"name": "full", "steps": 3}, {"name": "lora", "adapter": {"rank": 8}}]}
    assert flatten(tree) == {"cycles": "2", "stages.full.steps": "3", "stages.lora.adapter.rank": "8"}
