"""End to end: plugins/plugins_demo.yaml uses the three pip-installed example plugins (ema stage, dora adapter
and its search fragment, masked_l1 loss) in a real `fluxtune search`: Ray workers load them, MLflow records
the plugin set, and the registered model serves the DoRA adapter."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_plugins_packages import DEMO, examples_site  # noqa: F401  (module-scoped install fixture)

pytestmark = pytest.mark.e2e

EXPECTED_PLUGINS = {"ema": "fluxtune-ema==0.1.0", "dora": "fluxtune-dora==0.1.0",
                    "masked_l1": "fluxtune-masked-l1==0.1.0", "fluxtune.default_plugins.stages": "fluxtune==0.1.0"}


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory, session_cache, examples_site):  # noqa: F811
    import os

    workdir = tmp_path_factory.mktemp("plugins-demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLUXTUNE_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1", PYTHONPATH=str(examples_site))
    result = run_cli(["search", str(DEMO), "--set", "search.num_samples=1"], cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_the_demo_search_trains_with_all_three_plugins(demo_sweep):
    workdir, result = demo_sweep
    assert "cycle 0 refine (stage end)" in result.stdout  # the ema stage ran in the Ray worker
    assert "registered model 'plugins-demo' version 1" in result.stdout
    [adapter_json] = {p.read_text() for p in workdir.glob("runs/**/exports/adapter/fluxtune_adapter.json")}
    assert json.loads(adapter_json)["type"] == "dora"


def test_mlflow_records_the_plugin_set_and_the_plugins_params(demo_sweep):
    from mlflow import MlflowClient

    workdir, _ = demo_sweep
    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("plugins-demo").experiment_id])
    assert {r.data.tags["fluxtune.kind"] for r in runs} == {"sweep", "trial"}
    for run in runs:
        recorded = {k.removeprefix("fluxtune.plugin."): v for k, v in run.data.tags.items()
                    if k.startswith("fluxtune.plugin.")}
        assert EXPECTED_PLUGINS.items() <= recorded.items(), recorded
    [trial] = [r for r in runs if r.data.tags["fluxtune.kind"] == "trial"]
    assert trial.data.params["loss.type"] == "masked_l1" and trial.data.params["loss.outside"] == "0.25"
    assert trial.data.params["stages.lora.adapter.type"] == "dora"
    assert int(trial.data.params["stages.lora.adapter.rank"]) in (4, 8, 16)  # sampled from the dora_rank fragment
    assert 0.5 <= trial.data.metrics["ema_decay"] <= 0.95  # the ema stage's own metric, sampled decay


def test_the_registered_model_inpaints_with_the_dora_adapter(demo_sweep, session_cache):
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    workdir, _ = demo_sweep
    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # process-wide: an earlier in-process test may have pointed it elsewhere
    model = mlflow.pyfunc.load_model("models:/plugins-demo@candidate")
    [images] = list(session_cache.glob("sample/*n32-r32*/images"))
    out = model.predict(pd.DataFrame({"image": [str(images / "0001.png")], "mask": [str(images / "0001_mask.png")]}))
    picture = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert picture.size == (32, 32) and picture.mode == "RGB"
