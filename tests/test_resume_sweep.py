"""A sweep interrupted with Ctrl+C resumes (`--resume`) and a finished one is extended (`--more N`):
no trial runs twice, no MLflow run is duplicated, the Optuna study in durable storage holds every trial,
and trials after the first reuse the identical full stage instead of training it again.

Real `fluxtune` processes, a real local Ray, Optuna's sqlite storage and an MLflow sqlite store.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FLUXTUNE, run_cli

SWEEP = """\
name: resumable
base:
  data: {jsonl: sample, resolution: 64, batch_size: 4}
  eval_every: 10
  stages:
    - {name: full, type: full, steps: 10, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 10, optimizer: {lr: 2.0e-3}, adapter: {type: lora, rank: 4}}
search:
  num_samples: 2
  reuse_stages: true
  sampler: {type: random, seed: 5}
  scheduler: {type: fifo}
  space:
    stages.lora.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
tracking: {experiment: resumable}
"""

pytestmark = pytest.mark.e2e


def interrupt_after_first_trial(workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Start the sweep and press Ctrl+C once the first trial has finished."""
    proc = subprocess.Popen([str(FLUXTUNE), "search", "sweep.yaml"], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    deadline = time.monotonic() + 400
    for line in proc.stdout:
        lines.append(line)
        if " finished" in line and line.startswith("trial "):
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err)


def record(workdir: Path) -> dict:
    [path] = (workdir / "runs").glob("resumable-*/sweep.json")
    return json.loads(path.read_text())


def study_states(workdir: Path, study: str) -> list[str]:
    import optuna

    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{workdir / 'mlflow' / 'optuna.db'}")
    return [t.state.name for t in loaded.get_trials()]


def trial_runs(workdir: Path) -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("resumable")
    runs = client.search_runs([experiment.experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]
    assert len(sweeps) == 1, "resuming or extending must reuse the sweep's parent run"
    return [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]


def checkpoints(workdir: Path, sweep_id: str, trial: str) -> list[str]:
    return sorted(p.name for p in (workdir / "runs" / sweep_id / "train" / f"{sweep_id}-{trial}").glob("checkpoint_*"))


@pytest.mark.timeout(1500)  # three real sweeps; ≈1.5 min on an idle 2-core machine, far more when it is shared
def test_interrupt_resume_and_extend(tmp_path, cli_env):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    cli_env = {**cli_env, "COLUMNS": "400"}  # one line per message: rich wraps at the terminal width

    first = interrupt_after_first_trial(tmp_path, cli_env)
    assert first.returncode != 0, first.stdout[-2000:]
    interrupted = record(tmp_path)
    assert interrupted["status"] == "interrupted", first.stdout[-2000:] + first.stderr[-2000:]
    sweep_id = interrupted["sweep_id"]
    done_before = {t: checkpoints(tmp_path, sweep_id, t) for t, row in interrupted["trials"].items()
                   if row["steps"] == row["planned_steps"]}
    assert done_before, "the first trial finished before the interrupt"

    resumed = run_cli(["search", "sweep.yaml", "--resume"], cwd=tmp_path, env=cli_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"sweep {sweep_id} resumed" in resumed.stdout
    after = record(tmp_path)
    assert after["status"] == "finished" and len(after["trials"]) == 2
    for trial, names in done_before.items():  # a finished trial never runs again
        assert checkpoints(tmp_path, sweep_id, trial) == names
    assert study_states(tmp_path, sweep_id) == ["COMPLETE"] * 2
    runs = trial_runs(tmp_path)
    assert sorted(r.data.tags["fluxtune.trial_id"] for r in runs) == sorted(after["trials"])
    assert all(r.info.status == "FINISHED" for r in runs)

    # stage reuse: one full fine-tune, shared by every later trial
    reused = [row["reused_steps"] for row in after["trials"].values()]
    assert sorted(reused) == [0, 10]
    assert "10 reused from identical stages" in resumed.stdout

    extended = run_cli(["search", "sweep.yaml", "--more", "1"], cwd=tmp_path, env=cli_env)
    assert extended.returncode == 0, extended.stdout[-3000:] + extended.stderr[-3000:]
    final = record(tmp_path)
    assert len(final["trials"]) == 3 and final["tune_runs"] == ["tune", "more-1"]
    assert study_states(tmp_path, sweep_id) == ["COMPLETE"] * 3  # the sampler saw the first two
    assert len(trial_runs(tmp_path)) == 3
    assert sorted(row["reused_steps"] for row in final["trials"].values()) == [0, 10, 10]
    best = tmp_path / "runs" / sweep_id / "best.yaml"
    assert best.exists() and f"fluxtune run {best}" in extended.stdout

    nothing = run_cli(["search", "sweep.yaml", "--resume"], cwd=tmp_path, env=cli_env, timeout=120)
    assert nothing.returncode == 2 and "no unfinished sweep named 'resumable'" in nothing.stderr
