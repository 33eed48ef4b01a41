"""The MLflow run tree, in-process on a real sqlite store: what a sweep leaves for people to browse."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtune.tracking.runs import CHECKPOINT_TAG, NOTE_TAG, STAGES_TABLE, SweepTracker, flatten
from fluxtune.flux.preview import LABEL_HEIGHT, ValidationPreview
from fluxtune.tracking.samples import decode_samples, encode_samples
from fluxtune.tracking.store import tracking_uri
from fluxtune.train.protocol import SAMPLES_KEY, TrialReport


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
    # The UI opens the experiment as model training (runs table), not in its GenAI view.
    assert c.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_before_gets_the_training_kind_but_a_kind_chosen_in_the_ui_stays(uri, exp):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    old = c.create_experiment(exp)
    SweepTracker(uri, exp, "s-1")
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    c.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    SweepTracker(uri, exp, "s-2")
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"


def test_trial_runs_are_named_by_their_values_and_names_stay_unique_in_the_sweep(uri, exp):
    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    first = tracker.start_trial("t1", {}, {}, name="r16-a96")
    second = tracker.start_trial("t2", {}, {}, name="r16-a96")
    c = tracker.client
    assert [c.get_run(r).info.run_name for r in (first, second)] == ["r16-a96", "r16-a96-2"]
    # A resumed sweep's new driver knows the names its earlier trials took.
    again = SweepTracker(uri, exp, "s-1")
    again.start(None, {}, {})
    assert c.get_run(again.start_trial("t3", {}, {}, name="r16-a96")).info.run_name == "r16-a96-3"


def test_results_become_step_metrics_and_system_metrics(uri, exp):
    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    run = tracker.start_trial("t1", {}, {})
    worker_node = {"system/cpu_utilization_percentage": 42.5, "system/system_memory_usage_megabytes": 1234.0}
    tracker.log_result("t1", TrialReport.from_result(_result(4, {0: 1.0, 1: 0.9, 2: 0.8, 3: 0.7}, **worker_node)))
    c = tracker.client
    assert [(m.step, m.value) for m in c.get_metric_history(run, "loss")] == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    assert [(m.step, m.value) for m in c.get_metric_history(run, "val_loss")] == [(4, 0.25)]
    assert "training_iteration" not in c.get_run(run).data.metrics  # Tune bookkeeping stays out
    # The trial's node as its rank-0 worker sampled it, at the report's step; never the driver's own node.
    assert [(m.step, m.value) for m in c.get_metric_history(run, "system/cpu_utilization_percentage")] == [(4, 42.5)]
    tracker.log_result("t1", TrialReport.from_result(_result(8, {}, stage_end=True, **worker_node)))
    assert [m.step for m in c.get_metric_history(run, "system/system_memory_usage_megabytes")] == [4, 8]
    other = tracker.start_trial("t2", {}, {})
    tracker.log_result("t2", TrialReport.from_result(_result(4, {0: 1.0})))  # a report without a sample
    assert not [k for k in c.get_run(other).data.metrics if k.startswith("system/")]


def test_rank_0_reports_carry_a_system_sample_of_its_node():
    from fluxtune.train.reporter import RayReporter

    rank0, rank1 = RayReporter(rank=0), RayReporter(rank=1)
    extras = rank0._report(4, {"val_loss": 0.5})
    assert 0 <= extras["system/cpu_utilization_percentage"] <= 100 and extras["system/system_memory_usage_megabytes"] > 0
    assert not [k for k in rank1._report(4, {"val_loss": 0.5}) if k.startswith("system/")]  # rank 0's only


def test_a_resumed_sweep_writes_to_the_same_runs_without_duplicates(uri, exp):
    first = SweepTracker(uri, exp, "s-1")
    parent = first.start(None, {}, {"base": {"seed": 0}})
    run = first.start_trial("t1", {"seed": 0}, {})
    first.log_result("t1", TrialReport.from_result(_result(3, {0: 1.0, 1: 0.9, 2: 0.8})))

    # A new driver process (resume): same sweep name → same parent; same trial id → same child.
    again = SweepTracker(uri, exp, "s-1")
    assert again.start(None, {}, {"base": {"seed": 0}}) == parent
    assert again.start_trial("t1", {"seed": 0}, {}) == run
    # The restarted trial replays steps 1..2 from its last stage checkpoint, then goes on.
    again.log_result("t1", TrialReport.from_result(_result(5, {1: 0.95, 2: 0.85, 3: 0.7, 4: 0.6})))
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
    # The starting weights' grid rides with the first report (step 40) but belongs to step 0.
    steps = tracker.log_samples("t1", encode_samples([(0, _png((0, 0, 255))), _png((255, 0, 0))]), 40)
    assert steps == [0, 40]
    # A stage end can carry two grids (before and after merging the adapter): the stage's last one is kept.
    assert tracker.log_samples("t1", encode_samples([_png((0, 255, 0)), _png((255, 255, 0))]), 44) == [44]

    checkpoint = tmp_path / "checkpoint_000"
    (checkpoint / "transformer").mkdir(parents=True)
    (checkpoint / "transformer" / "config.json").write_text("{}")
    (checkpoint / "exports" / "adapter").mkdir(parents=True)
    (checkpoint / "exports" / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    tracker.log_stage("t1", str(checkpoint), 0, "lora")
    tracker.log_result("t1", TrialReport.from_result(_result(4, {0: 1.0, 1: 0.5})))
    tracker.log_loss_curves("t1")

    c = tracker.client
    listed = {a.path for a in c.list_artifacts(run)}
    assert {"stages", "loss_curves.png", "images"} <= listed and "samples" not in listed  # each image stored once
    pngs = sorted(a.path for a in c.list_artifacts(run, "images") if a.path.endswith(".png"))
    assert len(pngs) == 3 and all(Path(p).name.startswith("samples+step+") for p in pngs)
    by_step = {int(Path(p).name.split("+")[2]): p for p in pngs}
    assert Image.open(c.download_artifacts(run, by_step[0], str(tmp_path))).getpixel((0, 0)) == (0, 0, 255)
    assert Image.open(c.download_artifacts(run, by_step[40], str(tmp_path))).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(c.download_artifacts(run, by_step[44], str(tmp_path))).getpixel((0, 0)) == (255, 255, 0)
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


def test_the_validation_preview_draws_and_scores_one_sampling_of_encoded_examples():
    from fluxtune.flux.encoded import ValidationSet, encode_examples
    from fluxtune.flux.model import build_tiny_fill

    bundle = build_tiny_fill(seed=0)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (3, 3, 64, 48)).astype("float32")
    mask = np.zeros((3, 1, 64, 48), "float32")
    mask[:, :, 16:40, 8:24] = 1
    val = ValidationSet.build(encode_examples(bundle, image, mask, image, [None, "a cat", None]), seed=1)
    delivered: list[tuple[bytes, int | None]] = []
    preview = ValidationPreview.for_worker({"preset": "tiny-fill", "seed": 0, "guidance": 30.0}, val,
                                           lambda png, step: delivered.append((png, step)))
    transformer = bundle.transformer.train()
    scores = preview(transformer)
    png = delivered[-1][0]
    assert delivered == [(png, None)] and transformer.training  # train mode restored
    assert set(scores) == {"masked_psnr", "masked_ssim"}
    assert preview(transformer, step=0) == scores and delivered[-1] == (png, 0)  # same weights, same grid
    grid = Image.open(io.BytesIO(png))
    # A header naming the columns, then source | mask | prediction | target, one row per example; 64x48 images
    # are enlarged 2x (whole pixels) to reach the 96 px a person can read.
    assert grid.size == (4 * 96, LABEL_HEIGHT + 3 * 128)
    header = np.asarray(grid)[:LABEL_HEIGHT]
    assert all(header[:, x * 96:(x + 1) * 96].max() > 127 for x in range(4))  # a label over every column
    assert decode_samples(json.loads(json.dumps({SAMPLES_KEY: encode_samples([png])}))[SAMPLES_KEY]) == [(None, png)]
    # The mask panel is the exact pixel mask, unpacked from its 256 packed channels.
    mask_panel = np.asarray(grid)[LABEL_HEIGHT:LABEL_HEIGHT + 128:2, 96:192:2, 0]
    assert np.array_equal(mask_panel > 127, mask[0, 0] > 0.5)
    # The prediction drawn is the one scored: the same sampling.
    prediction_panel = np.asarray(grid)[LABEL_HEIGHT:LABEL_HEIGHT + 128:2, 192:288:2]
    assert np.array_equal(prediction_panel, preview.predictions(transformer)[0])
    # The prediction depends on the weights.
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05)
    preview(transformer)
    assert delivered[-1][0] != png


def test_flatten_keys_stages_by_name_like_search_paths():
    tree = {"cycles": 2, "stages": [{"name": "full", "steps": 3}, {"name": "lora", "adapter": {"rank": 8}}]}
    assert flatten(tree) == {"cycles": "2", "stages.full.steps": "3", "stages.lora.adapter.rank": "8"}


def test_stage_ends_fill_a_table_instead_of_single_dot_metrics(uri, exp):
    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    run = tracker.start_trial("t1", {}, {})
    for cycle, stage, step in ((0, "full", 4), (0, "lora", 8)):
        end = _result(step, {step - 1: 0.5}, stage_end=True, cycle=cycle, stage=stage, steps_per_s=10.0 * step,
                      transition_s=0.5, **{f"{stage}/cycle{cycle}/val_loss": 1.0 / step})
        tracker.log_result("t1", TrialReport.from_result(end))
        tracker.log_stage_summary("t1", TrialReport.from_result(end))
    c = tracker.client
    metrics = c.get_run(run).data.metrics
    assert "val_loss" in metrics and "loss" in metrics  # curves: points at every evaluation and step
    assert not {"steps_per_s", "transition_s", "full/cycle0/val_loss"} & set(metrics)  # one number per stage
    table = json.loads(Path(c.download_artifacts(run, STAGES_TABLE)).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["cycle"], r["stage"], r["global_step"], r["steps_per_s"]) for r in rows] == [
        (0, "full", 4, 40.0), (0, "lora", 8, 80.0)]
    assert rows[1]["val_loss"] == pytest.approx(1 / 8)
    assert {"path": STAGES_TABLE, "type": "table"} in json.loads(c.get_run(run).data.tags["mlflow.loggedArtifacts"])


def test_a_stopped_trial_says_so_and_every_trial_ends_when_its_training_did(uri, exp):
    import mlflow

    tracker = SweepTracker(uri, exp, "s-1")
    tracker.start(None, {}, {})
    stopped, finished = tracker.start_trial("t1", {}, {}), tracker.start_trial("t2", {}, {})
    tracker.end_trial("t1", "FINISHED", ("asha", 40, 100))
    tracker.end_trial("t2", "FINISHED")
    c = tracker.client
    tags = c.get_run(stopped).data.tags
    assert (tags["fluxtune.status"], tags["fluxtune.stopped_by"], tags["fluxtune.stopped_at_step"]) == (
        "stopped", "asha", "40")
    assert "ASHA" in tags[NOTE_TAG] and "step 40 of 100" in tags[NOTE_TAG]  # the run's description in the UI
    assert c.get_run(finished).data.tags["fluxtune.status"] == "finished"
    assert NOTE_TAG not in c.get_run(finished).data.tags
    trained_until = c.get_run(finished).info.end_time

    # Registration logs the model into the best trial's run later: that reopens and re-ends it ...
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=finished):
        mlflow.log_param("registered", "yes")
    assert c.get_run(finished).info.end_time > trained_until
    # ... and the sweep's end puts the training's end time back.
    tracker.finish("FINISHED", {}, {})
    assert c.get_run(finished).info.end_time == trained_until
    assert c.get_run(finished).info.status == "FINISHED"
