"""The small ASHA sweep several e2e tests read (early stopping frees workers; the stopped-trial marker in MLflow and
its UI): two 6-step trials on 32 px data, one learning rate that cannot learn, so ASHA stops it at its first
rung. Run once per session by the `asha_sweep` fixture (tests/conftest.py); tests that change its store copy it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The grid sampler's order for this seed (optuna 5): lr 1e-3 first, then 1e-8, which cannot learn, so ASHA's
# first rung (step 2, reduction factor 2) stops it.
SWEEP = """\
name: asha
base:
  data: {jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}
  eval_every: 2
  stages:
    - {name: full, type: full, steps: 6, optimizer: {lr: 1.0e-3}}
search:
  num_samples: 2
  sampler: {type: grid, seed: 1}
  scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
  space:
    stages.full.optimizer.lr: {type: categorical, choices: [1.0e-3, 1.0e-8]}
tracking: {experiment: asha}
"""
STEPS = 6
EXPERIMENT = "asha"


@dataclass
class AshaSweep:
    work: Path  # cwd of the sweep: sweep.yaml, runs/, mlflow/
    result: subprocess.CompletedProcess

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow' / 'mlflow.db'}"

    def trial_runs(self) -> list:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("fluxtune.kind") == "trial"]

    def copy_store(self, into: Path) -> Path:
        target = into / "mlflow"
        shutil.copytree(self.work / "mlflow", target)
        return target

    def failure(self) -> str:
        return self.result.stdout[-3000:] + self.result.stderr[-3000:]


def run_asha(work: Path, fluxtune: Path, env: dict[str, str]) -> AshaSweep:
    (work / "sweep.yaml").write_text(SWEEP)
    result = subprocess.run([str(fluxtune), "search", "sweep.yaml"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)
    return AshaSweep(work, result)
