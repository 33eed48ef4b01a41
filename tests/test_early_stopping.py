"""Trials that ASHA stops end their Ray Train run at once, so later trials get the CPUs (no hang).

Without fluxtune.train.stops a stopped trial's run blocks on its next report forever and keeps its worker's
CPU; with one CPU per trial on a small local Ray, the sweep then never finishes.
"""

from __future__ import annotations

import os

from conftest import run_cli

SWEEP = """\
name: asha
base:
  data: {jsonl: sample, resolution: 64, batch_size: 4}
  eval_every: 10
  stages:
    - {name: full, type: full, steps: 30, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 30, adapter: {type: lora, rank: 4}}
search:
  num_samples: 5
  sampler: {type: random, seed: 1}
  scheduler: {type: asha, grace_period: 10, reduction_factor: 2}
  space:
    stages.full.optimizer.lr: {type: float, low: 1.0e-6, high: 3.0e-3, log: true}
tracking: {experiment: asha}
"""


def test_stopped_trials_free_their_workers_and_the_sweep_finishes(tmp_path, session_cache):
    from mlflow import MlflowClient

    (tmp_path / "sweep.yaml").write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    result = run_cli(["search", "sweep.yaml"], cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("asha")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("fluxtune.kind") == "trial"]
    assert len(trials) == 5 and all(t.info.status == "FINISHED" for t in trials)
    last_steps = [max(m.step for m in client.get_metric_history(t.info.run_id, "loss")) for t in trials]
    assert any(step < 59 for step in last_steps), f"ASHA stopped no trial: {last_steps}"
    assert any(step == 59 for step in last_steps), f"no trial ran to the end: {last_steps}"
