"""Process faults lose nothing, in one chain of real `fluxtune` processes on one sweep: a killed Train worker is
retried from the last stage checkpoint, a SIGKILLed driver leaves no Ray process and `--resume` finishes the
sweep from the interrupted trial's own stage checkpoint, `--more` extends it on the same Optuna study, and
trials after the first reuse the identical full stage. A Ctrl+C in the middle of a trial publishes nothing (no
model version, no best.yaml) and the `--resume` that completes the sweep registers the true best; while a sweep
runs, a second `--resume` of it and a second sweep on its sqlite store are refused with one line.

A gate callback (a test plugin, installed like any other) holds a Train worker at the start of chosen stages
until the test opens the gate, so every fault lands exactly where it should, whatever the machine's speed.
Real local Ray (its own session, see fluxtune.train.local_ray), Optuna's sqlite storage and an MLflow sqlite
store; the faults are real signals sent from outside (`os.kill`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FLUXTUNE, REPO, LineReader, run_cli
from test_bad_inputs import fake_install
from fluxtune.train.local_ray import session_pids

pytestmark = pytest.mark.e2e

GATE = """
    import json, os, time
    from pathlib import Path

    import fluxtune
    from fluxtune.api import Params


    class GateParams(Params):
        folder: str
        stages: list[str]
        cycles: list[int] | None = None  # None: every cycle


    class Gate:
        '''At the start of a gated stage: announce arrival n (waiting-n.json), wait until the test writes go-n.'''

        def __init__(self, params):
            self.params = params

        def on_stage_start(self, ctx):
            if ctx.name not in self.params.stages or ctx.rank != 0:
                return
            if self.params.cycles is not None and ctx.cycle not in self.params.cycles:
                return
            folder = Path(self.params.folder)
            n = 1 + len(list(folder.glob("waiting-*.json")))
            (folder / f"waiting-{n}.json").write_text(json.dumps({"stage": ctx.name, "pid": os.getpid()}))
            deadline = time.monotonic() + 300
            while not (folder / f"go-{n}").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate {n} ({ctx.name}) was never opened")
                time.sleep(0.05)
"""
GATE_PLUGIN = GATE + """

    @fluxtune.hookimpl
    def register_callbacks(register):
        register("gate", Gate, params=GateParams, doc="holds a stage until the test lets it go (tests only)")
"""

SWEEP = """\
name: chain
base:
  data: {{jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}}
  eval_every: 2
  callbacks: [{{type: gate, folder: {gates}, stages: [lora, polish]}}]
  stages:
    - {{name: full, type: full, steps: 4, optimizer: {{lr: 1.0e-3}}}}
    - {{name: lora, type: lora, steps: 4, adapter: {{type: lora, rank: 4}}}}
    - {{name: polish, type: lora, steps: 2, adapter: {{type: lora, rank: 2}}}}
search:
  num_samples: 2
  reuse_stages: true
  sampler: {{type: random, seed: 3}}
  scheduler: {{type: fifo}}
  space:
    stages.lora.optimizer.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tracking: {{experiment: chain}}
"""
FULL, LORA, POLISH = 4, 4, 2


class Gates:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()

    def arrival(self, n: int, process: subprocess.Popen, timeout: float = 300, lines: LineReader | None = None) -> dict:
        """Wait until a worker waits at gate `n`; returns what it announced (stage, pid)."""
        path = self.folder / f"waiting-{n}.json"
        deadline = time.monotonic() + timeout
        output = (lambda: lines.text()[-6000:]) if lines is not None else (lambda: "")
        while not path.exists():
            assert process.poll() is None, f"the sweep ended (exit {process.returncode}) before gate {n}\n{output()}"
            assert time.monotonic() < deadline, f"no worker reached gate {n} within {timeout:.0f} s\n{output()}"
            time.sleep(0.1)
        time.sleep(0.05)  # written, not half-written
        return json.loads(path.read_text())

    def open(self, n: int) -> None:
        (self.folder / f"go-{n}").touch()


def record(workdir: Path) -> dict:
    [path] = (workdir / "runs").glob("chain-*/sweep.json")
    return json.loads(path.read_text())


def checkpoints(workdir: Path, sweep_id: str, trial: str) -> list[str]:
    folder = workdir / "runs" / sweep_id / "train" / f"{sweep_id}-{trial}"
    return sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())


def trial_runs(workdir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("chain")
    runs = client.search_runs([experiment.experiment_id])
    assert len([r for r in runs if r.data.tags.get("fluxtune.kind") == "sweep"]) == 1, "one parent run, always"
    return [r for r in runs if r.data.tags.get("fluxtune.kind") == "trial"]


def study_states(workdir: Path, study: str) -> list[str]:
    import optuna

    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{workdir / 'mlflow' / 'optuna.db'}")
    return [t.state.name for t in loaded.get_trials()]


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


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_sweep_outlives_its_test():
    """A failed assertion leaves the sweep it was watching waiting at a gate: end it with the test."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def start(workdir: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, LineReader]:
    # SIGINT restored to its default: a test run from a background shell inherits it ignored (Ctrl+C test)
    process = subprocess.Popen([str(FLUXTUNE), "search", "sweep.yaml", *args], cwd=workdir, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _started.append(process)
    return process, LineReader(process.stdout)


def registered(workdir: Path) -> dict[str, str]:
    """Registered versions of the chain's model: version → trial."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not client.search_registered_models():
        return {}
    return {str(v.version): v.tags["trial"] for v in client.search_model_versions("name='chain'")}


def candidate(workdir: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias("chain", "candidate").version)


def finish(process: subprocess.Popen, lines: LineReader, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    out = lines.finish()
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.mark.timeout(900)
def test_worker_kill_driver_kill_resume_and_more(tmp_path, cli_env):
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    fake_install(site, "fluxtune-gate", "gate", GATE_PLUGIN)
    gates = Gates(tmp_path / "gates")
    (work / "sweep.yaml").write_text(SWEEP.format(gates=gates.folder))
    env = {**cli_env, "COLUMNS": "400", "PYTHONPATH": f"{REPO}{os.pathsep}{site}"}  # this checkout first

    # 1. A Train worker killed in trial 1's LoRA stage: Train restarts the group from the full stage's checkpoint.
    sweep, lines = start(work, env)
    first_arrival = gates.arrival(1, sweep, lines=lines)
    assert first_arrival["stage"] == "lora"
    # Train takes a report from a worker asynchronously: wait until the full stage's checkpoint is registered
    assert lines.wait_for("cycle 0 full ended)", sweep, timeout=60), lines.text()[-3000:]
    os.kill(first_arrival["pid"], signal.SIGKILL)
    assert gates.arrival(2, sweep, lines=lines)["stage"] == "lora"  # the retried worker group, at the same stage
    gates.open(2)
    assert gates.arrival(3, sweep, lines=lines)["stage"] == "polish"
    gates.open(3)

    # 2. The driver SIGKILLed while trial 2 (which reused trial 1's full stage) waits at its polish stage.
    assert gates.arrival(4, sweep, lines=lines)["stage"] == "lora"
    gates.open(4)
    assert gates.arrival(5, sweep, lines=lines)["stage"] == "polish"
    # trial 2's lora stage end has reached the driver too (trial 1's was the first such line)
    assert lines.wait_for("cycle 0 lora ended)", sweep, timeout=60, count=2), lines.text()[-3000:]
    killed = record(work)
    sweep_id = killed["sweep_id"]
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    output = lines.finish()
    assert f"retried from step {FULL} after a worker failure (rank 0: " in output, output[-4000:]
    started = dict(re.findall(r"^(\S+) started \(trial (\w+),", output, re.M))  # trial name → Tune trial id
    [first] = [started[line.split()[0]] for line in output.splitlines() if " finished: " in line]
    [second] = set(started.values()) - {first}

    assert killed["status"] == "running" and len(killed["ray_sessions"]) == 1
    assert wait_for_no_ray(killed["ray_sessions"][0]) == [], "Ray processes outlived the killed driver"
    crashed = Path(killed["ray_sessions"][0]["temp_dir"])
    assert list(crashed.glob("session_*/logs/raylet.out"))  # Ray's logs of a crashed run are kept
    shutil.rmtree(crashed)
    first_before, second_before = checkpoints(work, sweep_id, first), checkpoints(work, sweep_id, second)
    assert len(first_before) == 3  # full, lora (trained twice: the first attempt's worker died), polish
    assert len(second_before) == 1  # its own lora stage; the full stage was trial 1's

    # 3. --resume, Ctrl+C while the interrupted trial is in the middle (at its polish stage): nothing is published.
    resumed, lines = start(work, env, "--resume")
    assert gates.arrival(6, resumed, lines=lines)["stage"] == "polish"
    again = run_cli(["search", "sweep.yaml", "--resume"], cwd=work, env=env, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    [line] = [text for text in again.stderr.splitlines() if text.startswith("error:")]
    assert f"sweep {sweep_id} is already running in pid {resumed.pid}" in line
    (work / "other.yaml").write_text(SWEEP.format(gates=gates.folder).replace("name: chain", "name: other"))
    other = run_cli(["search", "other.yaml"], cwd=work, env=env, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-2000:]
    [line] = [text for text in other.stderr.splitlines() if text.startswith("error:")]
    assert f"mlflow.db is in use by sweep {sweep_id}, pid {resumed.pid}" in line and "one sweep at a time" in line
    assert not list((work / "runs").glob("other-*"))  # refused before anything was written
    os.kill(resumed.pid, signal.SIGINT)
    resumed.wait(timeout=120)
    out = lines.finish()
    assert resumed.returncode == 130, out[-4000:]
    assert "nothing is registered and no best.yaml is written until the sweep completes" in out
    assert record(work)["status"] == "interrupted" and record(work)["registered"] == {}
    assert registered(work) == {} and not (work / "runs" / sweep_id / "best.yaml").exists()

    # --resume again: the finished trial never runs again; the interrupted one trains only its polish stage; the
    # true best is registered.
    resumed, lines = start(work, env, "--resume")
    assert gates.arrival(7, resumed, lines=lines)["stage"] == "polish"
    gates.open(7)
    out = finish(resumed, lines)
    assert f"sweep {sweep_id} resumed" in out
    after = record(work)
    assert after["status"] == "finished" and sorted(after["trials"]) == sorted([first, second])
    assert all(row["steps"] == row["planned_steps"] == FULL + LORA + POLISH for row in after["trials"].values())
    assert sorted(row["reused_steps"] for row in after["trials"].values()) == [0, FULL]
    assert f"{FULL} reused from identical stages" in out
    assert checkpoints(work, sweep_id, first) == first_before
    second_after = checkpoints(work, sweep_id, second)
    assert len(second_after) == 2 and second_after[0] == second_before[0]
    assert study_states(work, sweep_id) == ["COMPLETE"] * 2
    best = min(after["trials"].values(), key=lambda row: row["val_loss"])["trial"]
    assert registered(work) == {"1": best} and candidate(work) == "1"
    assert after["registered"] == {best: ["chain", "1"]}

    runs = {r.data.tags["fluxtune.trial_id"]: r for r in trial_runs(work)}
    assert sorted(runs) == sorted([first, second])  # no duplicate run
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs[first].data.tags["fluxtune.retries"] == "1"
    last_retry = runs[first].data.tags["fluxtune.last_retry"]
    assert last_retry.startswith("rank 0: ") and last_retry.endswith(f"resumed at step {FULL}")
    assert runs[first].data.metrics["worker_failures"] == 1
    assert runs[first].data.metrics["resumed_from_step"] == FULL
    assert runs[second].data.metrics["resumed_from_step"] == FULL + LORA
    assert len(after["ray_sessions"]) == 3  # the resumed runs' clusters are gone, temp dirs included
    assert all(ray_processes_left(session) == [] for session in after["ray_sessions"][1:])
    assert not any(Path(session["temp_dir"]).exists() for session in after["ray_sessions"][1:])

    # 4. --more 1: a third trial on the same study (the sampler saw the first two), reusing the full stage.
    extended, lines = start(work, env, "--more", "1")
    for n in (8, 9):
        gates.arrival(n, extended, lines=lines)
        gates.open(n)
    out = finish(extended, lines)
    final = record(work)
    assert len(final["trials"]) == 3 and final["tune_runs"] == ["tune", "more-1"]
    assert study_states(work, sweep_id) == ["COMPLETE"] * 3
    assert len(trial_runs(work)) == 3
    assert sorted(row["reused_steps"] for row in final["trials"].values()) == [0, FULL, FULL]
    best_yaml = work / "runs" / sweep_id / "best.yaml"
    assert best_yaml.exists() and f"fluxtune run {best_yaml}" in out
    third = (set(final["trials"]) - {first, second}).pop()
    best_now = min(final["trials"].values(), key=lambda row: row["val_loss"])["trial"]
    assert registered(work) == ({"1": best} if best_now == best else {"1": best, "2": third})
    assert registered(work)[candidate(work)] == best_now  # the alias is on the best of all three

    nothing = run_cli(["search", "sweep.yaml", "--resume"], cwd=work, env=env, timeout=120)
    assert nothing.returncode == 2 and "no unfinished sweep named 'chain'" in nothing.stderr
