"""End to end: the three pip-installed example plugins (ema stage, dora adapter, masked_l1 loss) in a real
`fluxtune search` (the reference sweep, tests/reference.py): Ray workers load them, MLflow records the plugin
set, and the registered model serves the DoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxtune.tracking.runs import STAGES_TABLE

from reference import MODEL

pytestmark = pytest.mark.e2e

EXPECTED_PLUGINS = {"ema": "fluxtune-ema==0.1.0", "dora": "fluxtune-dora==0.1.0",
                    "masked_l1": "fluxtune-masked-l1==0.1.0", "notify": "fluxtune-notify==1.0",
                    "fluxtune.default_plugins.stages": "fluxtune==0.1.0"}


def test_the_sweep_trains_with_every_plugin(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    assert "(cycle 0 refine ended)" in reference_sweep.result.stdout  # the ema stage ran in the Ray workers
    exported = {json.loads(p.read_text())["type"]
                for p in reference_sweep.work.glob("runs/**/exports/adapter/fluxtune_adapter.json")}
    assert exported == {"lora", "dora"}


def test_mlflow_records_the_plugin_set_and_the_plugins_params(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    runs = reference_sweep.runs("sweep") + reference_sweep.runs("trial")
    for run in runs:
        recorded = {k.removeprefix("fluxtune.plugin."): v for k, v in run.data.tags.items()
                    if k.startswith("fluxtune.plugin.")}
        assert EXPECTED_PLUGINS.items() <= recorded.items(), recorded
    for trial in reference_sweep.runs("trial"):
        assert trial.data.params["loss.type"] == "masked_l1" and trial.data.params["loss.outside"] == "0.25"
        assert trial.data.params["stages.dora.adapter.type"] == "dora"
        stages = json.loads(Path(reference_sweep.client().download_artifacts(trial.info.run_id, STAGES_TABLE))
                            .read_text())  # the stage table: one row per finished stage
        rows = [dict(zip(stages["columns"], row)) for row in stages["data"]]
        assert [row["ema_decay"] for row in rows if row["stage"] == "refine"] == [0.9]  # the ema stage's own number


def test_the_registered_model_inpaints_with_the_dora_adapter(reference_sweep):
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    mlflow.set_tracking_uri(reference_sweep.tracking_uri)
    mlflow.set_registry_uri(reference_sweep.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    adapter = json.loads(next(reference_sweep.work.glob("mlflow/artifacts/**/adapter/fluxtune_adapter.json")).read_text())
    assert adapter["type"] == "dora"
    images = reference_sweep.work / "train" / "images"
    out = model.predict(pd.DataFrame({"image": [str(images / "0001.png")], "mask": [str(images / "0001_mask.png")]}))
    picture = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert picture.size == (32, 32) and picture.mode == "RGB"
