"""Trials that ASHA stops end their Ray Train run at once, so later trials get the CPUs (no hang).

Without fluxtune.train.stops a stopped trial's run blocks on its next report forever and keeps its worker's
CPU; with one CPU per trial on a small local Ray, the sweep then never finishes.
"""

from __future__ import annotations

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e

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
  num_samples: 3
  sampler: {type: grid, seed: 1}
  scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
  space:
    stages.full.optimizer.lr: {type: categorical, choices: [1.0e-3, 1.0e-6, 1.0e-8]}
tracking: {experiment: asha}
"""
STEPS = 6


def test_stopped_trials_free_their_workers_and_the_sweep_finishes(tmp_path, cli_env):
    from mlflow import MlflowClient

    (tmp_path / "sweep.yaml").write_text(SWEEP)
    result = run_cli(["search", "sweep.yaml"], cwd=tmp_path, env=cli_env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("fluxtune.kind") == "trial"]
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    last_steps = {t.data.params["stages.full.optimizer.lr"]: max(m.step for m in client.get_metric_history(
        t.info.run_id, "loss")) for t in trials}
    assert any(step < STEPS - 1 for step in last_steps.values()), f"ASHA stopped no trial: {last_steps}"
    assert any(step == STEPS - 1 for step in last_steps.values()), f"no trial ran to the end: {last_steps}"
