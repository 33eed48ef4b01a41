"""Scale-out on an existing engine: a real 2-node Ray cluster on this machine (`ray start --head` + a second
`ray start --address`), trials placed on both nodes, checkpoints on S3 (a moto server) that every node reaches.

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

import pytest

from conftest import run_cli, s3_bucket

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
  stages:
    - {{name: full, type: full, steps: 4, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 4, adapter: {{type: lora, rank: 4}}}}
search:
  num_samples: 2
  max_concurrent: 2
  sampler: {{type: random, seed: 1}}
  scheduler: {{type: fifo}}
  space:
    stages.lora.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{experiment: two-nodes}}
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
def two_node_cluster(s3_endpoint, cli_env):
    """Yields (address, env). Both nodes inherit the S3 endpoint's environment, as a real cluster's nodes would.
    Token auth on (Ray's default for clusters): every node and the driver read the same ~/.ray/auth_token."""
    temp_dir = tempfile.mkdtemp(prefix="ft-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    port = _free_port()
    env = {**cli_env, **s3_endpoint, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
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


@pytest.mark.timeout(900)
def test_a_sweep_on_an_existing_two_node_cluster_with_s3_storage(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    nodes = _cluster_nodes(address, env, tmp_path)
    assert len(nodes) == 2

    bucket = s3_bucket(f"fluxtune-{uuid.uuid4().hex[:8]}")
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(storage=f"{bucket}/sweeps"))
    done = run_cli(["search", "sweep.yaml", "--address", address], cwd=tmp_path, env={**env, "COLUMNS": "300"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered" in done.stdout  # the best adapter went from S3 into the model registry

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two-nodes")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("fluxtune.kind") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    placed = {r.data.tags["fluxtune.node"] for r in trials}
    assert placed == set(nodes), "one trial on each node"
    for run in trials:  # every stage checkpoint lives in the bucket, referenced by its s3:// URI
        stage_uris = [v for k, v in run.data.tags.items() if k.startswith("fluxtune.checkpoint.")]
        assert len(stage_uris) == 2 and all(u.startswith(f"{bucket}/sweeps/") for u in stage_uris)

    import boto3

    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://")) for o in page.get("Contents", [])]
    progress = [k for k in keys if k.endswith("/progress.json") and "/train/" in k]
    assert len(progress) == 4  # 2 trials × 2 stages
    assert any("/tune/" in k for k in keys)  # Tune's experiment state too: --resume works from any machine
    [sweep_folder] = (tmp_path / "runs").iterdir()
    assert not (sweep_folder / "train").exists()  # nothing of the trials' data on the driver's disk
