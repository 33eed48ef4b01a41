"""End to end: `fluxtune search` on the tiny model with a real local Ray, Optuna and an MLflow sqlite store."""

from __future__ import annotations

import pytest

from conftest import run_cli

SWEEP = """\
name: e2e
base:
  data: {jsonl: sample, resolution: 64, batch_size: 4}
  cycles: 1
  eval_every: 10
  stages:
    - {name: full, type: full, steps: 20, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 20, optimizer: {lr: 2.0e-3}, adapter: {type: lora, rank: 8}}
search:
  num_samples: 2
  sampler: {type: random, seed: 3}
  scheduler: {type: fifo}
  space:
    stages.lora.adapter.rank: {type: categorical, choices: [4, 8]}
    cycles: {type: int, low: 1, high: 2}
tracking: {experiment: e2e, register_as: e2e-lora}
"""


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, session_cache):
    import os

    workdir = tmp_path_factory.mktemp("sweep")
    (workdir / "sweep.yaml").write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    result = run_cli(["search", "sweep.yaml"], cwd=workdir, env=env)
    return workdir, result


def test_the_sweep_finishes_with_a_summary(finished_sweep):
    _, result = finished_sweep
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best trial" in result.stdout
    assert "registered model 'e2e-lora' version 1" in result.stdout


def test_mlflow_holds_the_run_tree_losses_and_the_registered_adapter(finished_sweep):
    from mlflow import MlflowClient

    workdir, result = finished_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]
    assert len(sweeps) == 1 and len(trials) == 2
    parent = sweeps[0].info.run_id
    assert all(t.data.tags["mlflow.parentRunId"] == parent for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    assert any(a.path == "sweep.yaml" for a in client.list_artifacts(parent))

    for trial in trials:
        cycles = int(trial.data.params["cycles"])
        assert trial.data.params["stages.lora.adapter.rank"] in {"4", "8"}
        losses = client.get_metric_history(trial.info.run_id, "loss")
        assert [m.step for m in losses] == list(range(40 * cycles))  # every step, once
        val = sorted(client.get_metric_history(trial.info.run_id, "val_loss"), key=lambda m: m.step)
        assert val[-1].value < val[0].value, "validation loss must fall during training"
        adapters = client.list_artifacts(trial.info.run_id, "stages/cycle0-lora/adapter")
        assert any(a.path.endswith("pytorch_lora_weights.safetensors") for a in adapters)

    version = client.get_model_version_by_alias("e2e-lora", "candidate")
    assert str(version.version) == "1"  # int from sqlite, str over HTTP
    assert version.run_id in {t.info.run_id for t in trials}
    assert version.tags["trial"] and version.tags["stage"] == "lora"


def test_the_registered_model_inpaints(finished_sweep, sample_jsonl):
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    workdir, result = finished_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # process-wide: an earlier in-process test may have pointed it elsewhere
    model = mlflow.pyfunc.load_model("models:/e2e-lora@candidate")
    images = sample_jsonl.parent / "images"
    out = model.predict(pd.DataFrame({"image": [str(images / "0003.png")], "mask": [str(images / "0003_mask.png")]}))
    picture = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert picture.size == (64, 64) and picture.mode == "RGB"


BAD_INPUTS = {
    "yaml-syntax": ("name: x\nbase: {stages: [\n", "bad.yaml:3", "YAML syntax error"),
    "unknown-key": (SWEEP.replace("  cycles: 1\n", "  cycles: 1\n  cylces: 2\n"), "bad.yaml:5:3: base.cylces",
                    "unknown key"),
    "missing-jsonl": (SWEEP.replace("jsonl: sample", "jsonl: /no/such/data.jsonl"), "bad.yaml:3",
                      "'/no/such/data.jsonl' does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_fast_with_one_located_line(case, tmp_path, cli_env):
    text, where, what = BAD_INPUTS[case]
    (tmp_path / "bad.yaml").write_text(text)
    result = run_cli(["search", "bad.yaml"], cwd=tmp_path, env=cli_env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert where in lines[0] and what in lines[0]
    # nothing started, nothing written: no Ray results, no MLflow store
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow").exists()
