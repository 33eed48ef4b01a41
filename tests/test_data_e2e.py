"""End to end: `fluxtune run` with bad rows skipped, an explicit validation file and 2 Ray Train workers on this
2-core machine. The driver builds the latent cache once; the skipped count lands on the MLflow sweep run."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from fluxtune.data.sample import write_sample_dataset

RUN = """\
name: data-e2e
base:
  data: {{jsonl: {train}, val_jsonl: {val}, resolution: 32, batch_size: 2, on_bad_rows: skip}}
  workers: 2
  cycles: 1
  eval_every: 3
  stages:
    - {{name: full, type: full, steps: 3, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 3, optimizer: {{lr: 1.0e-3}}, adapter: {{type: lora, rank: 4}}}}
tracking: {{experiment: data-e2e}}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_cache):
    import os

    work = tmp_path_factory.mktemp("data-e2e")
    train = write_sample_dataset(work / "train", n=10, resolution=32, seed=2)
    with train.open("a") as file:  # one bad row: its target does not exist
        file.write(json.dumps({"user_input": {"image": "images/0000.png", "mask": "images/0000_mask.png"},
                               "output": "images/missing.png"}) + "\n")
    val = write_sample_dataset(work / "val", n=3, resolution=32, seed=3)
    (work / "run.yaml").write_text(RUN.format(train=train, val=val))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    return work, run_cli(["run", "run.yaml"], cwd=work, env=env, timeout=300)


@pytest.mark.e2e
def test_two_workers_train_from_the_cache_built_once_by_the_driver(finished_run):
    work, result = finished_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert "13 rows, 1 bad rows skipped; latent cache" in out and "(built in" in out
    caches = [p for p in (work / "cache" / "latents").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert (manifest["rows"], manifest["val_file_rows"]) == (13, 3)


@pytest.mark.e2e
def test_the_skipped_row_count_is_a_param_of_the_sweep_run(finished_run):
    from mlflow import MlflowClient

    work, result = finished_run
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("data-e2e").experiment_id])
    (sweep,) = [r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]
    assert sweep.data.params["data.skipped_rows"] == "1"
    assert sweep.data.params["data.rows"] == "13"
    (trial,) = [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]
    assert trial.info.status == "FINISHED"
    assert "val_loss" in trial.data.metrics
