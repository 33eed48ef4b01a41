"""Process faults lose nothing and what a sweep keeps, reuses, resumes and registers is complete, finite and
verified: one chain of real `fluxtune` processes on one sweep (its storage on a small tmpfs).

1. A killed Train worker is retried from the last stage checkpoint; trial 2 reuses trial 1's identical full stage.
2. A SIGKILLed driver leaves no Ray process; `--resume` continues the interrupted trial from its own checkpoint.
   While it runs, a second `--resume` and a second sweep on its sqlite store are refused with one line; a Ctrl+C
   in the middle of a trial publishes nothing (no model version, no best.yaml).
3. `--resume` again finishes the sweep: trial 2 diverges (NaN: FAIL in the study, FAILED in MLflow, never best);
   a byte flipped in the best trial's release makes registration refuse that checkpoint (one line naming it);
   only what is needed keeps its transformer weights.
4. `--more 1` beside a corrupt and a foreign sweep.json (skipped, with a warning): stage reuse refuses the changed
   shared stage; the store fills up while the new trial trains, and the sweep stops resumable, nothing half-written.
5. `--resume` once there is room: the third trial (same Optuna study) finishes and is registered by reference to
   its base, and the registered model loads from that reference (and says so in one line once the base is gone).

Test plugins (installed like any other): a gate callback holds a Train worker at the start of chosen stages until
the test opens it, so every fault lands exactly where it should, whatever the machine's speed; a score callback
sets the last stage's val_loss per trial, so the outcome is known. Real local Ray (its own session, see
fluxtune.train.local_ray), Optuna's sqlite storage and an MLflow sqlite store; the faults are real signals sent
from outside (`os.kill`).
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
SCORE = """

    class ScoreParams(Params):
        folder: str
        stage: str
        values: list[str]


    class Score:
        '''The n-th trial to end `stage` (counted once per trial, across restarts) reports val_loss = values[n].'''

        def __init__(self, params):
            self.params = params

        def on_stage_end(self, ctx, metrics):
            import ray.train

            if ctx.name != self.params.stage or ctx.rank != 0:
                return {}
            run = ray.train.get_context().get_experiment_name()
            mine = Path(self.params.folder) / f"score-{run}"
            if not mine.exists():
                mine.write_text(str(len(list(Path(self.params.folder).glob("score-*")))))
            n = int(mine.read_text())
            return {"val_loss": float(self.params.values[n])} if n < len(self.params.values) else {}
"""
GATE_PLUGIN = GATE + SCORE + """

    @fluxtune.hookimpl
    def register_callbacks(register):
        register("gate", Gate, params=GateParams, doc="holds a stage until the test lets it go (tests only)")
        register("score", Score, params=ScoreParams, doc="sets a stage's val_loss per trial (tests only)")
"""

SWEEP = """\
name: chain
base:
  data: {{jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}}
  eval_every: 2
  callbacks:
    - {{type: gate, folder: {gates}, stages: [lora, polish]}}
    - {{type: score, folder: {scores}, stage: polish, values: ['0.003', nan, '0.001']}}
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
storage_path: {runs}
"""
FULL, LORA, POLISH = 4, 4, 2
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


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


def record(runs: Path) -> dict:
    [path] = [p for p in runs.glob("chain-2*/sweep.json")]  # not the corrupt ones the chain adds
    return json.loads(path.read_text())


def checkpoints(runs: Path, sweep_id: str, trial: str) -> list[str]:
    folder = runs / sweep_id / "train" / f"{sweep_id}-{trial}"
    return sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())


class Store:
    """The sweep's storage: a small tmpfs that can be filled (root), else a folder that can be made read-only."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        self.tmpfs = mounted.returncode == 0

    def fill(self, leave: int = 128 << 10) -> None:
        """No room for a stage checkpoint (≈0.5 MiB), room for small records (tmpfs); else read-only."""
        if self.tmpfs:
            with open(self.folder / "ballast", "wb") as ballast:
                ballast.truncate(0)
                ballast.write(b"0" * max(shutil.disk_usage(self.folder).free - leave, 0))
        else:
            for path in [self.folder, *self.folder.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o555)

    def free(self) -> None:
        if self.tmpfs:
            (self.folder / "ballast").unlink()
        else:
            for path in [self.folder, *self.folder.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one exponent bit, same size
    path.write_bytes(bytes(data))


def weight_files(sweep: Path) -> list[Path]:
    return sorted(sweep.rglob(WEIGHTS))


def left_behind(sweep: Path) -> list[str]:
    """Temporary or half-written things: temp files and folders, checkpoint folders without a complete marker."""
    from fluxtune.checkpoints import read_checkpoint_manifest

    junk = [str(p) for p in sweep.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    junk += [str(c) for c in sweep.glob("train/*/checkpoint_*") if c.is_dir() and read_checkpoint_manifest(c) is None]
    return junk


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


@pytest.mark.timeout(1200)
def test_worker_kill_driver_kill_resume_corruption_full_store_and_more(tmp_path, cli_env):
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    fake_install(site, "fluxtune-gate", "gate", GATE_PLUGIN)
    gates, scores = Gates(tmp_path / "gates"), tmp_path / "scores"
    scores.mkdir()
    store = Store(tmp_path / "disk")
    runs = store.folder / "runs"
    (work / "sweep.yaml").write_text(SWEEP.format(gates=gates.folder, scores=scores, runs=runs))
    env = {**cli_env, "COLUMNS": "400", "PYTHONPATH": f"{REPO}{os.pathsep}{site}"}  # this checkout first
    try:
        _chain(work, env, gates, store, runs)
    finally:
        store.close()


def _chain(work: Path, env: dict[str, str], gates: Gates, store: Store, runs: Path) -> None:
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
    killed = record(runs)
    sweep_id = killed["sweep_id"]
    folder = runs / sweep_id
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    output = lines.finish()
    assert f"retried from step {FULL} after a worker failure (rank 0: " in output, output[-4000:]
    started = dict(re.findall(r"^(\S+) started \(trial (\w+),", output, re.M))  # trial name → Tune trial id
    [first] = [started[line.split()[0]] for line in output.splitlines() if " finished: " in line]
    [second] = set(started.values()) - {first}
    assert len(sweep_id.split("-")[-1]) == 6  # a random suffix

    assert killed["status"] == "running" and len(killed["ray_sessions"]) == 1
    assert wait_for_no_ray(killed["ray_sessions"][0]) == [], "Ray processes outlived the killed driver"
    crashed = Path(killed["ray_sessions"][0]["temp_dir"])
    assert list(crashed.glob("session_*/logs/raylet.out"))  # Ray's logs of a crashed run are kept
    shutil.rmtree(crashed)
    first_before, second_before = checkpoints(runs, sweep_id, first), checkpoints(runs, sweep_id, second)
    assert len(first_before) == 3  # full, lora (trained twice: the first attempt's worker died), polish
    assert len(second_before) == 1  # its own lora stage; the full stage was trial 1's

    # 3. --resume, Ctrl+C while the interrupted trial is in the middle (at its polish stage): nothing is published.
    resumed, lines = start(work, env, "--resume")
    assert gates.arrival(6, resumed, lines=lines)["stage"] == "polish"
    again = run_cli(["search", "sweep.yaml", "--resume"], cwd=work, env=env, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    [line] = [text for text in again.stderr.splitlines() if text.startswith("error:")]
    assert f"sweep {sweep_id} is already running in pid {resumed.pid}" in line
    (work / "other.yaml").write_text((work / "sweep.yaml").read_text().replace("name: chain", "name: other"))
    other = run_cli(["search", "other.yaml"], cwd=work, env=env, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-2000:]
    [line] = [text for text in other.stderr.splitlines() if text.startswith("error:")]
    assert f"mlflow.db is in use by sweep {sweep_id}, pid {resumed.pid}" in line and "one sweep at a time" in line
    assert not list(runs.glob("other-*"))  # refused before anything was written
    os.kill(resumed.pid, signal.SIGINT)
    resumed.wait(timeout=120)
    out = lines.finish()
    assert resumed.returncode == 130, out[-4000:]
    assert "nothing is registered and no best.yaml is written until the sweep completes" in out
    assert record(runs)["status"] == "interrupted" and record(runs)["registered"] == {}
    assert registered(work) == {} and not (folder / "best.yaml").exists()

    # 4. --resume again: the finished trial never runs again; the interrupted one trains only its polish stage and
    # diverges (NaN: failed, never best). Meanwhile a byte flips in trial 1's release (the base of its adapter) and
    # in the shared full stage: the best trial is not registered from a changed checkpoint.
    resumed, lines = start(work, env, "--resume")
    assert gates.arrival(7, resumed, lines=lines)["stage"] == "polish"
    first_folder = folder / "train" / f"{sweep_id}-{first}"
    shared, first_base = str(first_folder / first_before[0]), first_folder / first_before[1]  # its full and lora
    assert shared in [json.loads(p.read_text())["checkpoint"] for p in folder.glob("stage_cache/*.json")]
    for flipped in (Path(shared) / WEIGHTS, first_base / WEIGHTS):
        flip_a_byte(flipped)
    gates.open(7)
    out = finish(resumed, lines)
    assert f"sweep {sweep_id} resumed" in out
    after = record(runs)
    assert after["status"] == "finished" and sorted(after["trials"]) == sorted([first, second])
    assert all(row["steps"] == row["planned_steps"] == FULL + LORA + POLISH for row in after["trials"].values())
    assert sorted(row["reused_steps"] for row in after["trials"].values()) == [0, FULL]
    assert f"{FULL} reused from identical stages" in out
    assert after["trials"][second]["error"].startswith("val_loss is nan at step ")
    names = {trial: name for name, trial in started.items()}
    assert f"{names[second]} failed: val_loss is nan at step {FULL + LORA + POLISH}" in out, out[-6000:]
    assert after["trials"][first]["val_loss"] == 0.003
    assert f"({first}): val_loss=0.003" in out  # best trial <its name> (<its id>)
    assert (f"trial {first} is not registered: refusing stage checkpoint {first_base}: {WEIGHTS} does not match "
            "the sha256 in its progress.json") in out, out[-6000:]
    assert checkpoints(runs, sweep_id, first) == first_before
    second_after = checkpoints(runs, sweep_id, second)
    assert len(second_after) == 2 and second_after[0] == second_before[0]
    assert study_states(work, sweep_id) == ["COMPLETE", "FAIL"]
    assert registered(work) == {} and after["registered"] == {}  # nothing published from a changed checkpoint
    # kept: the shared stage (trial 2 started from it) and the best trial's release; everything else is pruned
    assert weight_files(folder) == sorted([Path(shared) / WEIGHTS, first_base / WEIGHTS])
    assert "2 transformer weight files (checkpoints: keep needed)" in out

    trial_runs_now = {r.data.tags["fluxtune.trial_id"]: r for r in trial_runs(work)}
    assert sorted(trial_runs_now) == sorted([first, second])  # no duplicate run
    assert trial_runs_now[first].info.status == "FINISHED"
    assert trial_runs_now[second].info.status == "FAILED"
    assert trial_runs_now[second].data.tags["fluxtune.failure"] == after["trials"][second]["error"]
    assert trial_runs_now[first].data.tags["fluxtune.retries"] == "1"
    last_retry = trial_runs_now[first].data.tags["fluxtune.last_retry"]
    assert last_retry.startswith("rank 0: ") and last_retry.endswith(f"resumed at step {FULL}")
    assert trial_runs_now[first].data.metrics["worker_failures"] == 1
    assert trial_runs_now[first].data.metrics["resumed_from_step"] == FULL
    assert trial_runs_now[second].data.metrics["resumed_from_step"] == FULL + LORA
    assert len(after["ray_sessions"]) == 3  # the resumed runs' clusters are gone, temp dirs included
    assert all(ray_processes_left(session) == [] for session in after["ray_sessions"][1:])
    assert not any(Path(session["temp_dir"]).exists() for session in after["ray_sessions"][1:])

    # 5. --more 1 beside a corrupt and a foreign sweep.json: both skipped; stage reuse refuses the changed shared
    # stage; the store fills up while the new trial trains: it stops resumable with nothing half-written.
    (runs / "chain-garbage").mkdir()
    (runs / "chain-garbage" / "sweep.json").write_text('{"name": "chain", "sweep_')
    (runs / "other-tool").mkdir()
    (runs / "other-tool" / "sweep.json").write_text('{"name": "chain", "owner": "someone else"}')
    extended, lines = start(work, env, "--more", "1")
    assert gates.arrival(8, extended, lines=lines)["stage"] == "lora"
    store.fill()
    gates.open(8)
    extended.wait(timeout=300)
    out = lines.finish()
    assert extended.returncode == 1, out[-4000:]
    for bad in ("chain-garbage", "other-tool"):
        assert f"skipping {runs / bad / 'sweep.json'}: not a readable fluxtune sweep file" in out
    assert (f": refusing stage checkpoint {shared}: {WEIGHTS} does not match the sha256 in its progress.json "
            "(changed or corrupted since it was written); it is not used") in out, out[-6000:]
    stopped = "no space to write stage checkpoint" if store.tmpfs else "cannot write stage checkpoint"
    assert stopped in out and "the sweep stopped" in out and "--resume" in out, out[-4000:]
    assert record(runs)["status"] == "interrupted" and stopped in record(runs)["stopped_by"]
    assert left_behind(folder) == []
    assert "RUNNING" not in {r.info.status for r in trial_runs(work)}

    # 6. Room again: --resume finishes the third trial (on the same study), registers it by reference, and it loads.
    store.free()
    resumed, lines = start(work, env, "--resume")
    for n in (9, 10):
        gates.arrival(n, resumed, lines=lines)
        gates.open(n)
    out = finish(resumed, lines)
    final = record(runs)
    assert final["status"] == "finished" and len(final["trials"]) == 3 and final["tune_runs"] == ["tune", "more-1"]
    [third] = set(final["trials"]) - {first, second}
    assert final["trials"][third]["val_loss"] == 0.001 and not final["trials"][third]["error"]
    assert sorted(row["reused_steps"] for row in final["trials"].values()) == [0, 0, FULL]  # the changed one: not
    assert study_states(work, sweep_id) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert len(trial_runs(work)) == 3
    best_yaml = folder / "best.yaml"
    assert f"trial {third}, val_loss=0.001" in best_yaml.read_text() and f"fluxtune run {best_yaml}" in out
    assert "registered model 'chain' version 1" in out, out[-6000:]
    assert registered(work) == {"1": third} and candidate(work) == "1"
    [base] = final["pinned"]
    assert third in base and (Path(base) / WEIGHTS).exists()
    assert weight_files(folder) == sorted([Path(shared) / WEIGHTS, Path(base) / WEIGHTS])  # reused; registered
    assert left_behind(folder) == []

    import mlflow.pyfunc

    from fluxtune.version_contents import RegisteredBaseError

    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    assert mlflow.pyfunc.load_model("models:/chain@candidate") is not None
    (Path(base) / WEIGHTS).rename(Path(base) / "moved")
    with pytest.raises(RegisteredBaseError, match=f"is gone: {Path(base) / WEIGHTS} no longer exists"):
        mlflow.pyfunc.load_model("models:/chain@candidate")

    nothing = run_cli(["search", "sweep.yaml", "--resume"], cwd=work, env=env, timeout=120)
    assert nothing.returncode == 2 and "no unfinished sweep named 'chain'" in nothing.stderr
