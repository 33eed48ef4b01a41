"""A tracking server that is down at the start stops a sweep before any compute; one that goes away mid-sweep
costs nothing: writes are buffered (in memory and in a spill file), replayed in order when it answers again,
and reported exactly when it never does. Everything here runs against a real `mlflow server` subprocess; the
end-to-end outage (a real sweep on a two-node cluster) is in tests/test_cluster.py."""

from __future__ import annotations

import json
import sys
import time

import pytest

from fluxtune.tracking.buffer import SPILL_NAME
from fluxtune.tracking.runs import SweepTracker
from fluxtune.tracking.server import free_port, start_server, stop_server
from fluxtune.train.protocol import TrialReport

STEPS = '{"loss": [[%d, 1.0], [%d, 0.9]]}'


def _result(step: int) -> dict:
    return {"global_step": step + 1, "val_loss": 1.0 / (step + 2), "fluxtune_steps": STEPS % (step, step + 1)}


def _png() -> str:
    import io

    from PIL import Image

    from fluxtune.tracking.samples import encode_samples

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, "PNG")
    return encode_samples([buffer.getvalue()])


def test_writes_during_an_outage_are_kept_reported_and_sent_by_the_next_driver(tmp_path, monkeypatch):
    store, sweep = tmp_path / "store", tmp_path / "sweep"
    process, url = start_server(store, log_path=tmp_path / "server.log")
    warnings: list[str] = []
    try:
        tracker = SweepTracker(url, "outage", "outage-1", spill_dir=sweep, warn=warnings.append)
        parent = tracker.start(None, {}, {"cycles": 1})
        first = tracker.start_trial("t1", {"cycles": 1}, {})
        tracker.log_result("t1", TrialReport.from_result(_result(0)))
    finally:
        stop_server(process)

    # Down: nothing raises, nothing waits on MLflow's minutes of retries, one warning.
    started = time.monotonic()
    assert tracker.find_trial_run("t9") is None and tracker.stage_checkpoints("t1") == []  # reads: "unknown"
    tracker.log_loss_curves("t1")  # a read-then-write: the first call held back, whatever its kind
    tracker.log_result("t1", TrialReport.from_result(_result(2)))
    second = tracker.start_trial("t2", {"cycles": 1}, {})  # a run created while down: a placeholder id
    tracker.log_result("t2", TrialReport.from_result(_result(0)))
    tracker.log_samples("t2", _png(), 2)
    for trial in ("t1", "t2"):
        tracker.log_loss_curves(trial)
        tracker.end_trial(trial, "FINISHED")
    tracker.finish("FINISHED", {"best_val_loss": 0.25}, {"fluxtune.best_trial": "t1"})
    assert time.monotonic() - started < 60  # generous: the point is "not MLflow's default retry minutes"
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"MLflow at {url} unreachable (") and "buffering 1 loss_curves" in warnings[0]
    assert f"kept in {sweep / SPILL_NAME}" in warnings[0]
    spill = sweep / SPILL_NAME
    assert warnings[1].startswith(f"MLflow at {url} is still unreachable: not logged: ")
    for what in ("metric points", "runs created", "images", "run ends", "params", "tags"):
        assert what in warnings[1], (what, warnings[1])
    assert "metric names: best_val_loss, loss, " in warnings[1] and str(spill) in warnings[1]
    ops = [json.loads(line)["op"] for line in spill.read_text().splitlines()]
    assert ops[:2] == ["loss_curves", "log_batch"] and "create_run" in ops and ops[-1] == "set_terminated"

    # The driver is gone; a new one (a resumed sweep) finds the spill file and sends it, in order.
    process, url_again = start_server(store, port=int(url.rsplit(":", 1)[1]), log_path=tmp_path / "server.log")
    try:
        again = SweepTracker(url, "outage", "outage-1", spill_dir=sweep, warn=warnings.append)
        assert again.flush() and not spill.exists() and not spill.with_suffix(".files").exists()
        assert "could not log are in" in warnings[2] and "answers again" in warnings[3]
        from mlflow import MlflowClient

        client = MlflowClient(url)  # what the store holds, read past the buffer
        assert [m.step for m in client.get_metric_history(first, "loss")] == [0, 1, 2, 3]
        [trial_two] = client.search_runs([again.experiment_id], "tags.`fluxtune.trial_id` = 't2'")
        assert trial_two.info.run_id != second and trial_two.data.tags["mlflow.parentRunId"] == parent
        assert trial_two.info.status == "FINISHED" and trial_two.data.params["cycles"] == "1"
        assert [m.step for m in client.get_metric_history(trial_two.info.run_id, "loss")] == [0, 1]
        artifacts = {a.path for a in client.list_artifacts(trial_two.info.run_id)}
        assert {"loss_curves.png", "images"} <= artifacts
        assert client.get_run(parent).info.status == "FINISHED"
        assert client.get_run(parent).data.metrics["best_val_loss"] == 0.25
    finally:
        stop_server(process)


SPEC = """\
name: outage
base:
  data: {jsonl: sample, resolution: 32, sample_size: 8, batch_size: 2}
  stages:
    - {name: full, type: full, steps: 2}
tracking: {uri: "URI"}
"""


def test_an_unreachable_server_at_start_ends_the_sweep_before_ray_with_one_line(tmp_path, monkeypatch, capsys,
                                                                               session_cache):
    from fluxtune.cli.main import main

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("FLUXTUNE_CACHE", str(session_cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(SPEC.replace("URI", url))
    monkeypatch.setattr(sys, "argv", ["fluxtune", "search", "sweep.yaml"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main()
    err = capsys.readouterr().err
    assert ended.value.code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: sweep.yaml:6:12: tracking.uri: MLflow tracking server {url} is unreachable (")
    assert line.endswith("): start it with `fluxtune ui` or fix tracking.uri")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no runs/, no mlflow/
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()

