"""End to end: `fluxtune search` on the tiny model with a real local Ray, Optuna and an MLflow sqlite store.

The sweep is the shared reference sweep (tests/reference.py): two trials of full → lora → ema → dora stages on
two Ray Train workers."""

from __future__ import annotations

import pytest

from conftest import run_cli
from reference import MODEL, STAGES, STEPS

@pytest.mark.e2e
def test_the_sweep_finishes_with_a_summary(reference_sweep):
    result = reference_sweep.result
    assert result.returncode == 0, reference_sweep.failure()
    assert "best trial" in result.stdout
    assert f"registered model '{MODEL}' version 1" in result.stdout


@pytest.mark.e2e
def test_mlflow_holds_the_run_tree_losses_and_the_registered_adapter(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    client = reference_sweep.client()
    [sweep] = reference_sweep.runs("sweep")
    trials = reference_sweep.runs("trial")
    assert len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == sweep.info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    assert any(a.path == "reference.yaml" for a in client.list_artifacts(sweep.info.run_id))
    assert sorted(t.data.params["stages.lora.adapter.rank"] for t in trials) == ["4", "8"]  # the grid, once each

    for trial in trials:
        losses = client.get_metric_history(trial.info.run_id, "loss")
        assert [m.step for m in losses] == list(range(STEPS))  # every step, once
        val = sorted(client.get_metric_history(trial.info.run_id, "val_loss"), key=lambda m: m.step)
        assert val[-1].value < val[0].value, "validation loss must fall during training"
        for stage in ("lora", "dora"):
            adapters = client.list_artifacts(trial.info.run_id, f"stages/cycle0-{stage}/adapter")
            assert any(a.path.endswith("pytorch_lora_weights.safetensors") for a in adapters), stage

    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(version.version) == "1"  # int from sqlite, str over HTTP
    assert version.run_id in {t.info.run_id for t in trials}
    assert version.tags["trial"] and version.tags["stage"] == list(STAGES)[-1]  # the last adapter stage


@pytest.mark.e2e
def test_the_registered_model_inpaints(reference_sweep):
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    mlflow.set_tracking_uri(reference_sweep.tracking_uri)
    mlflow.set_registry_uri(reference_sweep.tracking_uri)  # process-wide: earlier in-process tests may differ
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    images = reference_sweep.work / "val" / "images"
    out = model.predict(pd.DataFrame({"image": [str(images / "0001.png")], "mask": [str(images / "0001_mask.png")]}))
    picture = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert picture.size == (32, 32) and picture.mode == "RGB"


SWEEP = """\
name: e2e
base:
  data: {jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}
  cycles: 1
  stages:
    - {name: full, type: full, steps: 2}
search:
  num_samples: 2
tracking: {experiment: e2e}
"""

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
