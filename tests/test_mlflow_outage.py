"""A tracking server that is down at the start stops a sweep before any compute; one that goes away mid-sweep
costs nothing: writes are buffered (in memory and in a spill file), replayed in order when it answers again,
and reported exactly when it never does. Everything here runs against a real `mlflow server` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FLUXTUNE, LineReader
from fluxtune.tracking.buffer import HTTP_DEFAULTS, SPILL_NAME
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


SWEEP = """\
name: outage-e2e
base:
  data: {jsonl: sample, resolution: 32, sample_size: 16, batch_size: 4}
  cycles: 1
  eval_every: 5
  stages:
    - {name: full, type: full, steps: 10, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 10, optimizer: {lr: 2.0e-3}, adapter: {type: lora, rank: 4}}
search:
  num_samples: 2
  max_concurrent: 1
  sampler: {type: random, seed: 1}
  scheduler: {type: fifo}
  space:
    stages.lora.adapter.rank: {type: categorical, choices: [4, 8]}
tracking: {uri: "URI", experiment: outage-e2e, register_as: outage-lora}
"""


def _port_outside_ray_and_ephemeral_ranges() -> int:
    """Ray's workers take 10002-19999 and the OS hands out 32768+: a port there may be gone after a restart."""
    import random
    import socket

    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 20000-29999")


@pytest.mark.e2e
def test_a_server_outage_mid_sweep_loses_nothing_and_training_goes_on(tmp_path, session_cache, monkeypatch):
    from mlflow import MlflowClient

    for key, value in HTTP_DEFAULTS.items():  # this test's own client: fail in seconds, not minutes
        monkeypatch.setenv(key, value)
    began, phases = time.monotonic(), []  # the waits below stay inside pytest-timeout's 600 s, with output

    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    port = _port_outside_ray_and_ephemeral_ranges()
    servers = [start_server(store, port=port, log_path=tmp_path / "server.log")[0]]
    url = f"http://127.0.0.1:{port}"
    (work / "sweep.yaml").write_text(SWEEP.replace("URI", url))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen([str(FLUXTUNE), "search", "sweep.yaml"], cwd=work, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = LineReader(sweep.stdout), LineReader(sweep.stderr)
    shown = lambda: (f"--- phases {phases}\n--- stdout\n{out.text()[-4000:]}\n"  # noqa: E731
                     f"--- stderr\n{err.text()[-6000:]}")
    try:
        try:
            assert out.wait_for(" step 5/", sweep, timeout=240), shown()  # the first trial's first metrics
            phases.append(("first metrics", round(time.monotonic() - began)))
            stop_server(servers[0])
            phases.append(("server stopped", round(time.monotonic() - began)))
            # The next report finds the server gone: it is buffered and spilled into the sweep folder.
            assert err.wait_for("buffering", sweep, timeout=120), shown()
            assert list(work.glob(f"runs/*/{SPILL_NAME}"))
            phases.append(("buffering", round(time.monotonic() - began)))
            servers.append(start_server(store, port=port, log_path=tmp_path / "server.log")[0])
            phases.append(("server restarted", round(time.monotonic() - began)))
            try:
                assert sweep.wait(timeout=200) == 0, shown()
            except subprocess.TimeoutExpired:
                pytest.fail(f"the sweep did not end within 200 s of the server's restart\n{shown()}")
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGTERM)
                sweep.wait()
            time.sleep(0.5)  # the reader threads take the last lines
        warnings = [line for line in err.lines if line.startswith("warning: MLflow")]
        assert len([w for w in warnings if "unreachable (" in w]) == 1, shown()  # warned once
        assert any("answers again: logged" in w for w in warnings), shown()
        assert "still unreachable" not in err.text()
        finished = [line for line in out.lines if " finished: " in line]
        assert len(finished) == 2, shown()  # every trial trained to its end
        assert not list(work.glob(f"runs/*/{SPILL_NAME}"))  # everything was sent

        client = MlflowClient(url, registry_uri=url)
        experiment = client.get_experiment_by_name("outage-e2e")
        runs = client.search_runs([experiment.experiment_id])
        trials = [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]
        [parent] = [r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]
        assert len(trials) == 2 and parent.info.status == "FINISHED"
        for trial in trials:
            assert trial.info.status == "FINISHED"
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
            losses = client.get_metric_history(trial.info.run_id, "loss")
            assert sorted(m.step for m in losses) == list(range(20))  # every step, once, outage or not
            assert len(client.get_metric_history(trial.info.run_id, "val_loss")) == 4
            assert "loss_curves.png" in {a.path for a in client.list_artifacts(trial.info.run_id)}
        version = client.get_model_version_by_alias("outage-lora", "candidate")
        assert version.run_id in {t.info.run_id for t in trials}
    finally:
        for server in servers:
            stop_server(server)
