"""Process faults lose nothing: a SIGKILLed driver resumes (`--resume`) and a killed Train worker is retried,
both from the last stage checkpoint, and no Ray process of a run outlives it.

Real `fluxtune` processes, a real local Ray (its own session, see fluxtune.train.local_ray), Optuna's sqlite
storage and an MLflow sqlite store; the faults are real signals sent from outside (`os.kill`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FLUXTUNE, run_cli
from fluxtune.train.local_ray import session_pids

pytestmark = pytest.mark.e2e

SWEEP = """\
name: {name}
base:
  data: {{jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}}
  eval_every: 4
  stages:
    - {{name: full, type: full, steps: 4, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: {lora_steps}, adapter: {{type: lora, rank: 4}}}}
search:
  num_samples: {samples}
  sampler: {{type: random, seed: 3}}
  scheduler: {{type: fifo}}
  space:
    stages.lora.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{experiment: {name}}}
"""
FULL_STEPS = 4


def start_sweep(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(FLUXTUNE), "search", "sweep.yaml"], cwd=workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(proc: subprocess.Popen, lines: list[str], done) -> None:
    """Read the sweep's console until `done(line)` holds for a line (or the sweep ends: a test failure)."""
    for line in proc.stdout:
        lines.append(line)
        if done(line):
            return
    raise AssertionError("the sweep ended before the fault could be injected:\n" + "".join(lines)[-3000:])


def record(workdir: Path, name: str) -> dict:
    [path] = (workdir / "runs").glob(f"{name}-*/sweep.json")
    return json.loads(path.read_text())


def checkpoints(workdir: Path, sweep_id: str, trial: str) -> list[str]:
    folder = workdir / "runs" / sweep_id / "train" / f"{sweep_id}-{trial}"
    return sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())


def trial_runs(workdir: Path, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("fluxtune.kind") == "trial"]
    return {"client": client, "runs": runs}


def ray_processes_left(session: dict) -> list[int]:
    """Processes of that run's Ray cluster: its session (the keeper's), or anything holding its temp dir."""
    left = set(session_pids(session["session"]))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session["temp_dir"] in cmdline and int(entry.name) != os.getpid():
            left.add(int(entry.name))
    return sorted(left)


def wait_for_no_ray(session: dict, within_s: float = 120) -> list[int]:
    """The keeper cleans up once it notices its driver is gone: give it time on a busy machine."""
    deadline = time.monotonic() + within_s
    while (left := ray_processes_left(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.timeout(900)
def test_sigkilled_driver_resumes_from_the_stage_checkpoint_and_leaves_no_ray(tmp_path, cli_env):
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(name="killed-driver", lora_steps=24, samples=2))
    env = {**cli_env, "COLUMNS": "400"}

    proc = start_sweep(tmp_path, env)
    lines: list[str] = []
    read_until(proc, lines, lambda line: line.startswith("trial ") and " finished" in line)
    [first] = [line.split()[1] for line in lines if line.startswith("trial ") and " finished" in line]
    read_until(proc, lines, lambda line: "(stage end)" in line and first not in line)  # the 2nd trial's full stage
    second = lines[-1].split()[1]
    killed = record(tmp_path, "killed-driver")
    sweep_id = killed["sweep_id"]
    second_before = checkpoints(tmp_path, sweep_id, second)
    first_before = checkpoints(tmp_path, sweep_id, first)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()

    assert killed["status"] == "running" and len(killed["ray_sessions"]) == 1
    assert wait_for_no_ray(killed["ray_sessions"][0]) == [], "Ray processes outlived the killed driver"
    crashed = Path(killed["ray_sessions"][0]["temp_dir"])
    assert list(crashed.glob("session_*/logs/raylet.out"))  # Ray's logs of a crashed run are kept
    shutil.rmtree(crashed)
    assert len(second_before) == 1 and len(first_before) == 2

    resumed = run_cli(["search", "sweep.yaml", "--resume"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"sweep {sweep_id} resumed" in resumed.stdout
    after = record(tmp_path, "killed-driver")
    assert after["status"] == "finished" and sorted(after["trials"]) == sorted([first, second])
    assert all(row["steps"] == row["planned_steps"] == FULL_STEPS + 24 for row in after["trials"].values())
    assert checkpoints(tmp_path, sweep_id, first) == first_before  # a finished trial never runs again
    # the interrupted trial kept its full-stage checkpoint and trained only the LoRA stage again
    second_after = checkpoints(tmp_path, sweep_id, second)
    assert len(second_after) == 2 and second_after[0] == second_before[0]

    import optuna

    study = optuna.load_study(study_name=sweep_id, storage=f"sqlite:///{tmp_path / 'mlflow' / 'optuna.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 2

    mlflow = trial_runs(tmp_path, "killed-driver")
    runs = {r.data.tags["fluxtune.trial_id"]: r for r in mlflow["runs"]}
    assert sorted(runs) == sorted([first, second]) and len(mlflow["runs"]) == 2  # no duplicate run
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs[second].data.metrics["resumed_from_step"] == FULL_STEPS
    assert "resumed_from_step" not in runs[first].data.metrics

    # the resumed run ended normally: its cluster is gone by the time the command returns, temp dir included
    assert len(after["ray_sessions"]) == 2
    assert ray_processes_left(after["ray_sessions"][1]) == []
    assert not Path(after["ray_sessions"][1]["temp_dir"]).exists()


def train_worker_pids(session: int) -> list[int]:
    found = []
    for pid in session_pids(session):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.timeout(600)
def test_a_killed_train_worker_is_retried_from_the_last_stage_checkpoint(tmp_path, cli_env):
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(name="killed-worker", lora_steps=40, samples=1))
    env = {**cli_env, "COLUMNS": "400"}

    proc = start_sweep(tmp_path, env)
    lines: list[str] = []
    read_until(proc, lines, lambda line: "(stage end)" in line)  # the full stage's checkpoint is reported
    read_until(proc, lines, lambda line: " step " in line)  # and the LoRA stage has begun: kill mid-stage
    session = record(tmp_path, "killed-worker")["ray_sessions"][0]["session"]
    [worker] = train_worker_pids(session)
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=500)
    output = "".join(lines) + out
    assert proc.returncode == 0, output[-4000:]
    assert f"retried from step {FULL_STEPS} after a worker failure (rank 0: " in output

    done = record(tmp_path, "killed-worker")
    [(trial, row)] = done["trials"].items()
    assert row["steps"] == row["planned_steps"] == FULL_STEPS + 40 and not row["error"]
    sweep_id = done["sweep_id"]
    assert len(checkpoints(tmp_path, sweep_id, trial)) == 2  # the full stage was not trained again

    mlflow = trial_runs(tmp_path, "killed-worker")
    [run] = mlflow["runs"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["fluxtune.retries"] == "1"
    last_retry = run.data.tags["fluxtune.last_retry"]
    assert last_retry.startswith("rank 0: ") and last_retry.endswith(f"resumed at step {FULL_STEPS}")
    assert run.data.metrics["worker_failures"] == 1 and run.data.metrics["resumed_from_step"] == FULL_STEPS
    assert ray_processes_left(done["ray_sessions"][0]) == []
