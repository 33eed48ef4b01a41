"""The reference sweep: one real `fluxtune search` that many end-to-end tests read instead of running their own.

It exercises, in one sweep of two trials on two Ray Train workers: the three example plugins installed with pip
(`masked_l1` loss, `ema` stage, `dora` adapter), the built-in full and LoRA stages, a third-party callback
holding secrets (in the environment, the YAML and a `--set`), a data file with a bad row skipped and an
explicit validation file, the latent cache built by the driver, MLflow's run tree, the registry, and a grid
search over the LoRA rank. Tests that change what it wrote (aliases set through the UI) work on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

SECRET_VARIABLES = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY",
                    "MY_SERVICE_TOKEN")
EXPERIMENT = "reference"
MODEL = "reference-model"
STAGES = {"full": 4, "lora": 4, "refine": 2, "dora": 4}  # steps
STEPS = sum(STAGES.values())
TRAIN_ROWS, VAL_ROWS = 10, 3  # + one bad training row, skipped

NOTIFY_PLUGIN = """
    from pydantic import Field

    import fluxtune
    from fluxtune.api import Params


    class NotifyParams(Params):
        url: str = ""
        api_token: str = Field("", description="a webhook credential: the kind of value users paste into YAML")
        note: str = ""
        channel: str = ""


    class Notify:
        def __init__(self, params):
            self.params = params


    @fluxtune.hookimpl
    def register_callbacks(register):
        register("notify", Notify, params=NotifyParams, doc="posts stage ends to a webhook (test double: does not)")
"""

SWEEP = """\
name: reference
base:
  data: {{jsonl: {train}, val_jsonl: {val}, resolution: 32, batch_size: 2, on_bad_rows: skip}}
  workers: 2
  eval_every: 2
  loss: {{type: masked_l1, inside: 1.0, outside: 0.25}}
  callbacks:
    - {{type: nan_guard, every: 2}}
    - {{type: notify, url: "https://bot:{marker}@hooks.example.org/x", api_token: {marker}, note: "${{HF_TOKEN}}"}}
  stages:
    - {{name: full, type: full, steps: 4, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 4, optimizer: {{lr: 2.0e-3}}, adapter: {{type: lora, rank: 4}}}}
    - {{name: refine, type: ema, steps: 2, decay: 0.9, optimizer: {{lr: 5.0e-4}}}}
    - {{name: dora, type: lora, steps: 4, optimizer: {{lr: 2.0e-3}}, adapter: {{type: dora, rank: 4, alpha: 8}}}}
search:
  num_samples: 2
  sampler: {{type: grid}}
  scheduler: {{type: fifo}}
  space:
    stages.lora.adapter.rank: {{type: categorical, choices: [4, 8]}}
tracking: {{experiment: reference, register_as: reference-model}}
"""


@dataclass
class Reference:
    root: Path  # everything the sweep wrote lives below it (work/, cache/, site/)
    work: Path  # the sweep's working directory: reference.yaml, runs/, mlflow/
    env: dict[str, str]  # the environment it ran with (secrets and the installed plugins included)
    marker: str  # the secret's value
    result: subprocess.CompletedProcess

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow' / 'mlflow.db'}"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def runs(self, kind: str) -> list:
        client = self.client()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("fluxtune.kind") == kind]

    def copy_store(self, into: Path) -> Path:
        """A copy of the MLflow store (mlflow.db and artifacts/), for tests that change it."""
        target = into / "mlflow"
        shutil.copytree(self.work / "mlflow", target)
        return target

    def failure(self) -> str:
        return self.result.stdout[-3000:] + self.result.stderr[-3000:]


def write_data(work: Path) -> tuple[Path, Path]:
    from fluxtune.data.sample import write_sample_dataset

    train = write_sample_dataset(work / "train", n=TRAIN_ROWS, resolution=32, seed=2)
    with train.open("a") as file:  # one bad row: its target does not exist
        file.write(json.dumps({"user_input": {"image": "images/0000.png", "mask": "images/0000_mask.png"},
                               "output": "images/missing.png"}) + "\n")
    val = write_sample_dataset(work / "val", n=VAL_ROWS, resolution=32, seed=3)
    return train, val


def run_reference(root: Path, examples_site: Path, fluxtune: Path) -> Reference:
    from test_bad_inputs import fake_install

    work, site = root / "work", root / "site"
    work.mkdir()
    shutil.copytree(examples_site, site)
    fake_install(site, "fluxtune-notify", "notify", NOTIFY_PLUGIN)
    marker = f"sekret-{uuid.uuid4().hex}"
    train, val = write_data(work)
    (work / "reference.yaml").write_text(SWEEP.format(train=train, val=val, marker=marker))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "FLUXTUNE_"))}
    # the plugins' site first; a PYTHONPATH already set (a worktree tested against a shared venv) stays after it,
    # then this checkout, so the sweep runs the code under test even when PYTHONPATH was not set
    repo = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH"), str(repo)]))
    env.update(FLUXTUNE_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", PYTHONPATH=python_path,
               PYTHONDONTWRITEBYTECODE="1", COLUMNS="300", **{name: marker for name in SECRET_VARIABLES})
    result = subprocess.run([str(fluxtune), "search", "reference.yaml", "--set",
                             f"base.callbacks.1.channel=pasted {marker}"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)
    return Reference(root=root, work=work, env=env, marker=marker, result=result)
