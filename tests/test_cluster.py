"""Scale-out on an existing engine: a real 2-node Ray cluster on this machine (`ray start --head` + a second
`ray start --address`), trials placed on both nodes, checkpoints on S3 (a moto server) that every node reaches,
tracked by a real `mlflow server` that goes away mid-sweep: that costs nothing (writes are buffered in memory and
in a spill file, replayed in order when it answers again) and training goes on. A gate plugin (the fault chain's)
holds each trial at its LoRA stage, so the outage lands at the same place on any machine: trial 1 trains through
it, trial 2 after the server is back.

The cluster is private to this test (its own port and temp dir) and only its own processes are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import time

import pytest

from conftest import FLUXTUNE, REPO, LineReader, s3_bucket
from test_bad_inputs import fake_install
from test_faults import GATE, Gates
from fluxtune.tracking.buffer import HTTP_DEFAULTS, SPILL_NAME
from fluxtune.tracking.server import start_server, stop_server

pytestmark = pytest.mark.e2e
RAY = Path(sys.executable).with_name("ray")

SWEEP = """\
name: two-nodes
storage_path: {storage}
base:
  data: {{jsonl: sample, resolution: 32, batch_size: 4, sample_size: 16}}
  workers: 1
  cpus_per_worker: 1.0  # two trials never fit one 2-CPU node (1.01 each): they land on both
  eval_every: 4
  callbacks: [{{type: gate, folder: {gates}, stages: [lora]}}]
  stages:
    - {{name: full, type: full, steps: 8, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 8, adapter: {{type: lora, rank: 4}}}}
search:
  num_samples: 2
  max_concurrent: 2
  sampler: {{type: random, seed: 1}}
  scheduler: {{type: fifo}}
  space:
    stages.lora.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{uri: "{tracking}", experiment: two-nodes, register_as: two-nodes-lora}}
"""
STEPS, EVAL_EVERY = 16, 4
GATE_PLUGIN = GATE + """

    @fluxtune.hookimpl
    def register_callbacks(register):
        register("gate", Gate, params=GateParams, doc="holds a stage until the test lets it go (tests only)")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_start(args: list[str], env: dict[str, str]) -> int:
    """`ray start …` in a session of its own; returns its process group. Every daemon it leaves (raylet, GCS,
    agents) stays in that group, which is how the test stops exactly this cluster (agents rename themselves)."""
    proc = subprocess.Popen([str(RAY), "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    return proc.pid


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def two_node_cluster(s3_endpoint, cli_env, tmp_path):
    """Yields (address, env). Both nodes inherit the S3 endpoint's environment, as a real cluster's nodes would,
    and the gate plugin (installed in tmp_path/site). Token auth on (Ray's default for clusters): every node and
    the driver read the same ~/.ray/auth_token."""
    temp_dir = tempfile.mkdtemp(prefix="ft-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    port = _free_port()
    fake_install(tmp_path / "site", "fluxtune-gate", "gate", GATE_PLUGIN)
    env = {**cli_env, **s3_endpoint, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path / 'site'}"}
    common = ["--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    groups = []
    try:
        groups.append(_ray_start(["--head", f"--port={port}", "--include-dashboard=false",
                                  f"--temp-dir={temp_dir}", *common], env))
        address = f"127.0.0.1:{port}"
        groups.append(_ray_start([f"--address={address}", *common], env))
        yield address, env
    finally:
        for pgid in groups:
            _kill_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cluster_nodes(address: str, env: dict[str, str], cwd: Path) -> list[str]:
    """The alive node ids, seen by fluxtune's own start-up joining the cluster through RAY_ADDRESS."""
    probe = ("import json, ray; from fluxtune.train.cluster import start_ray; start_ray(None, 1); "
             "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_ADDRESS": address}, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _port_outside_ray_and_ephemeral_ranges() -> int:
    """Ray's workers take 10002-19999 and the OS hands out 32768+: a port there may be gone after a restart."""
    import random

    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 20000-29999")


@pytest.mark.timeout(900)
def test_a_sweep_on_a_two_node_cluster_with_s3_storage_outlives_a_tracking_server_outage(tmp_path, two_node_cluster,
                                                                                        monkeypatch):
    address, env = two_node_cluster
    nodes = _cluster_nodes(address, env, tmp_path)
    assert len(nodes) == 2
    for key, value in HTTP_DEFAULTS.items():  # this test's own client: fail in seconds, not minutes
        monkeypatch.setenv(key, value)
    began, phases = time.monotonic(), []  # the waits below stay inside pytest-timeout's limit, with output

    bucket = s3_bucket(f"fluxtune-{uuid.uuid4().hex[:8]}")
    port = _port_outside_ray_and_ephemeral_ranges()
    store = tmp_path / "store"
    servers = [start_server(store, port=port, log_path=tmp_path / "server.log")[0]]
    url = f"http://127.0.0.1:{port}"
    gates = Gates(tmp_path / "gates")
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(storage=f"{bucket}/sweeps", tracking=url, gates=gates.folder))
    sweep = subprocess.Popen([str(FLUXTUNE), "search", "sweep.yaml", "--address", address], cwd=tmp_path,
                             env={**env, "COLUMNS": "300"}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    out, err = LineReader(sweep.stdout), LineReader(sweep.stderr)
    shown = lambda: (f"--- phases {phases}\n--- stdout\n{out.text()[-4000:]}\n"  # noqa: E731
                     f"--- stderr\n{err.text()[-6000:]}")
    try:
        try:
            # both trials trained their full stage, with the server up, and wait at their LoRA stage
            first, second = (gates.arrival(n, sweep, timeout=300)["pid"] for n in (1, 2))
            assert first != second
            phases.append(("both at the gate", round(time.monotonic() - began)))
            stop_server(servers[0])
            phases.append(("server stopped", round(time.monotonic() - began)))
            gates.open(1)
            # trial 1's next report finds the server gone: it is buffered and spilled into the sweep folder
            assert err.wait_for("buffering", sweep, timeout=120), shown()
            assert list(tmp_path.glob(f"runs/*/{SPILL_NAME}"))
            phases.append(("buffering", round(time.monotonic() - began)))
            servers.append(start_server(store, port=port, log_path=tmp_path / "server.log")[0])
            phases.append(("server restarted", round(time.monotonic() - began)))
            gates.open(2)  # trial 2 trains after the server is back: the sweep cannot end before it answers
            try:
                assert sweep.wait(timeout=300) == 0, shown()
            except subprocess.TimeoutExpired:
                pytest.fail(f"the sweep did not end within 300 s of the server's restart\n{shown()}")
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGTERM)
                sweep.wait()
            time.sleep(0.5)  # the reader threads take the last lines
        assert "registered" in out.text(), shown()  # the best adapter went from S3 into the model registry
        warnings = [line for line in err.lines if line.startswith("warning: MLflow")]
        assert len([w for w in warnings if "unreachable (" in w]) == 1, shown()  # warned once
        assert any("answers again: logged" in w for w in warnings), shown()
        assert "still unreachable" not in err.text()
        assert len([line for line in out.lines if " finished: " in line]) == 2, shown()  # both trained to the end
        [sweep_folder] = (tmp_path / "runs").glob("two-nodes-*")
        assert not list(sweep_folder.glob(SPILL_NAME))  # everything was sent
        assert not (sweep_folder / "train").exists()  # nothing of the trials' data on the driver's disk

        from mlflow import MlflowClient

        client = MlflowClient(url, registry_uri=url)
        experiment = client.get_experiment_by_name("two-nodes")
        runs = client.search_runs([experiment.experiment_id])
        trials = [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]
        [parent] = [r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]
        assert len(trials) == 2 and parent.info.status == "FINISHED"
        placed = {r.data.tags["fluxtune.node"] for r in trials}
        assert placed == set(nodes), "one trial on each node"
        for trial in trials:
            assert trial.info.status == "FINISHED"
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
            losses = client.get_metric_history(trial.info.run_id, "loss")
            assert sorted(m.step for m in losses) == list(range(STEPS))  # every step, once, outage or not
            assert len(client.get_metric_history(trial.info.run_id, "val_loss")) == STEPS // EVAL_EVERY
            assert "loss_curves.png" in {a.path for a in client.list_artifacts(trial.info.run_id)}
            # every stage checkpoint lives in the bucket, referenced by its s3:// URI
            stage_uris = [v for k, v in trial.data.tags.items() if k.startswith("fluxtune.checkpoint.")]
            assert len(stage_uris) == 2 and all(u.startswith(f"{bucket}/sweeps/") for u in stage_uris)
        version = client.get_model_version_by_alias("two-nodes-lora", "candidate")
        assert version.run_id in {t.info.run_id for t in trials}
    finally:
        for server in servers:
            stop_server(server)

    import boto3

    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://")) for o in page.get("Contents", [])]
    progress = [k for k in keys if k.endswith("/progress.json") and "/train/" in k]
    assert len(progress) == 4  # 2 trials × 2 stages
    assert any("/tune/" in k for k in keys)  # Tune's experiment state too: --resume works from any machine
