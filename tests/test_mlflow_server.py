"""The same tracking and registry code against a real `mlflow server` over HTTP (started and stopped here)."""

from __future__ import annotations

import os

import pytest

from conftest import run_cli
from fluxtune.tracking.model_versions import promote, versions
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.samples import encode_samples
from fluxtune.tracking.server import start_server, stop_server
from fluxtune.train.protocol import TrialReport


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("server-store")
    process, url = start_server(store, log_path=store / "server.log")
    yield url, store
    stop_server(process)
    assert process.poll() is not None


def test_a_remote_server_records_the_run_tree_like_the_local_store(server, tmp_path):
    import io

    from PIL import Image

    url, store = server
    tracker = SweepTracker(url, "remote", "remote-1")
    parent = tracker.start(None, {"fluxtune.version": "0.1.0"}, {"cycles": 2})
    run = tracker.start_trial("t1", {"cycles": 2}, {})
    tracker.log_result("t1", TrialReport.from_result(
        {"global_step": 2, "val_loss": 0.5, "fluxtune_steps": '{"loss": [[0, 1.0], [1, 0.8]]}'}))
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buffer, "PNG")
    tracker.log_samples("t1", encode_samples([buffer.getvalue()]), 2)
    c = tracker.client
    assert [m.step for m in c.get_metric_history(run, "loss")] == [0, 1]
    assert c.get_run(run).data.tags["mlflow.parentRunId"] == parent
    # Artifacts went through the server into its own artifact store, not to a path the client chose.
    assert c.get_run(run).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((store / "artifacts").rglob("samples+step+2+*.png"))  # the image series, uploaded to the server
    # Resuming over HTTP finds the same runs.
    again = SweepTracker(url, "remote", "remote-1")
    assert again.start(None, {}, {"cycles": 2}) == parent and again.start_trial("t1", {}, {}) == run


def test_aliases_over_http_are_strings_and_models_list_shows_them(server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    url, _ = server
    client = MlflowClient(url, registry_uri=url)
    client.create_registered_model("remote-model")
    mlflow.set_tracking_uri(url)
    with mlflow.start_run() as run:
        mlflow.log_text("x", "x.txt")
    for _ in range(2):
        client.create_model_version("remote-model", f"runs:/{run.info.run_id}/x.txt", run.info.run_id)
    promote(url, "remote-model", "2", "champion", who="bob")
    raw = client.get_registered_model("remote-model").aliases
    assert raw == {"champion": "2"}  # HTTP gives str (sqlite gives int): versions() speaks str either way
    assert [v["aliases"] for v in versions(url, "remote-model")] == [[], ["champion"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    listed = run_cli(["models", "list", "remote-model"], tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    assert "champion" in listed.stdout and url in listed.stdout
