"""What a sweep keeps, reuses, resumes and registers is complete, finite and verified: the demo sweep
(searches/lora_rank.yaml, made small), through the real CLI, Ray, Optuna and MLflow, in three runs.

1. A trial whose val_loss turns NaN fails with the reason and is never best (its Optuna trial ends FAIL); a byte
   flipped in the shared full-stage checkpoint while the second trial trains makes registration refuse that
   checkpoint (one line naming the file); only what is needed keeps its transformer weights.
2. `--more 1` next to a corrupt and a foreign sweep.json: both are skipped with a warning; stage reuse refuses
   the flipped checkpoint; the store fills up while the new trial trains: the trial fails with the
   "no space to write stage checkpoint" line, the sweep stops resumable with nothing half-written.
3. `--resume` once there is room again: the trial finishes and is registered, by reference to its base, and
   the registered model loads from that reference.

Test plugins (installed like any other): a gate holds a worker at a stage start until the test opens it, and
a score callback sets the lora stage's val_loss per trial (NaN for the first) so the outcome is known.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_bad_inputs import fake_install
from test_faults import GATE, Gates, finish, no_sweep_outlives_its_test, start  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.e2e

PROBES = GATE + """

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


    @fluxtune.hookimpl
    def register_callbacks(register):
        register("gate", Gate, params=GateParams, doc="holds a stage until the test lets it go (tests only)")
        register("score", Score, params=ScoreParams, doc="sets a stage's val_loss per trial (tests only)")
"""

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
SMALL = {
    "  data: {jsonl: sample, resolution: 64, batch_size: 4}":
        "  data: {jsonl: sample, resolution: 32, batch_size: 2, sample_size: 16}",
    "  eval_every: 20": "  eval_every: 2",
    "{name: full, type: full, steps: 40,": "{name: full, type: full, steps: 2,",
    "      steps: 60\n": "      steps: 2\n",
    "  num_samples: 6 ": "  max_failures: 0\n  num_samples: 2 ",
    "  scheduler: {type: asha, grace_period: 60, reduction_factor: 2}": "  scheduler: {type: fifo}",
}


def demo_spec(gates: Path, scores: Path, disk: Path) -> str:
    """searches/lora_rank.yaml as it is, made small, with the probes and its storage on `disk`."""
    text = (REPO / "searches" / "lora_rank.yaml").read_text()
    for old, new in SMALL.items():
        assert old in text, old
        text = text.replace(old, new)
    probes = (f"  callbacks:\n    - {{type: gate, folder: {gates}, stages: [lora], cycles: [0]}}\n"
              f"    - {{type: score, folder: {scores}, stage: lora, values: [nan, '0.002', '0.001']}}\n")
    return text.replace("base:\n", "base:\n" + probes, 1) + f"storage_path: {disk / 'runs'}\n"


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


def sweep_record(runs: Path) -> dict:
    [path] = [p for p in runs.glob("lora-rank-2*/sweep.json")]  # not the corrupt ones the test adds
    return json.loads(path.read_text())


def weight_files(sweep: Path) -> list[Path]:
    return sorted(sweep.rglob(WEIGHTS))


def client(work: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def study_states(work: Path, study: str) -> list[str]:
    import optuna

    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{work / 'mlflow' / 'optuna.db'}")
    return [t.state.name for t in loaded.get_trials()]


def left_behind(sweep: Path) -> list[str]:
    """Temporary or half-written things: temp files and folders, checkpoint folders without a complete marker."""
    from fluxtune.checkpoints import read_checkpoint_manifest

    junk = [str(p) for p in sweep.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    junk += [str(c) for c in sweep.glob("train/*/checkpoint_*") if c.is_dir() and read_checkpoint_manifest(c) is None]
    return junk


@pytest.mark.timeout(900)
def test_nan_corruption_full_store_and_registration_by_reference(tmp_path, cli_env):
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    fake_install(site, "fluxtune-lifecycle-probes", "probes", PROBES)
    gates, scores = Gates(tmp_path / "gates"), tmp_path / "scores"
    scores.mkdir()
    store = Store(tmp_path / "disk")
    runs = store.folder / "runs"
    (work / "sweep.yaml").write_text(demo_spec(gates.folder, scores, store.folder))
    env = {**cli_env, "COLUMNS": "400", "PYTHONPATH": f"{REPO}{os.pathsep}{site}"}
    try:
        _three_runs(work, env, gates, store, runs)
    finally:
        store.close()


def _three_runs(work: Path, env: dict, gates: Gates, store: Store, runs: Path) -> None:
    # 1. Trial 1 diverges; trial 2 reuses trial 1's full stage, which changes on disk while trial 2 trains.
    sweep, lines = start(work, env)
    assert gates.arrival(1, sweep, lines=lines)["stage"] == "lora"
    gates.open(1)
    assert gates.arrival(2, sweep, lines=lines)["stage"] == "lora"
    first = sweep_record(runs)
    [shared] = [json.loads(p.read_text())["checkpoint"] for p in runs.glob("*/stage_cache/*.json")]
    flipped = Path(shared) / WEIGHTS
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40  # one exponent bit, same size
    flipped.write_bytes(bytes(data))
    gates.open(2)
    out = finish(sweep, lines)
    record = sweep_record(runs)
    sweep_id, folder = record["sweep_id"], runs / record["sweep_id"]
    assert sweep_id == first["sweep_id"] and len(sweep_id.split("-")[-1]) == 6  # a random suffix
    [nan_trial] = [r for r in record["trials"].values() if r["error"]]
    [good] = [r for r in record["trials"].values() if not r["error"]]
    assert nan_trial["error"].startswith("val_loss is nan at step ") and "not finite" in nan_trial["error"]
    assert f"trial {nan_trial['trial']} failed: val_loss is nan at step" in out, out[-6000:]
    assert good["val_loss"] == 0.002 and not good["error"]
    assert f"({good['trial']}): val_loss=0.002" in out  # best trial <its name> (<its id>)
    assert f"trial {good['trial']}, val_loss=0.002" in (folder / "best.yaml").read_text()
    assert sorted(study_states(work, sweep_id)) == ["COMPLETE", "FAIL"]
    assert (f"trial {good['trial']} is not registered: refusing stage checkpoint {shared}: {WEIGHTS} does not match "
            "the sha256 in its progress.json") in out, out[-6000:]
    assert not client(work).search_registered_models()  # nothing published from a changed checkpoint
    nan_run = [r for r in client(work).search_runs([client(work).get_experiment_by_name("lora-rank").experiment_id])
               if r.data.tags.get("fluxtune.trial_id") == nan_trial["trial"]]
    assert nan_run[0].info.status == "FAILED" and nan_run[0].data.tags["fluxtune.failure"] == nan_trial["error"]
    assert weight_files(folder) == [Path(shared) / WEIGHTS]  # the shared stage: reused, and the best trial's base
    assert "1 transformer weight file (checkpoints: keep needed)" in out

    # 2. --more 1 beside a corrupt and a foreign sweep.json; reuse refuses the changed stage; the store fills up.
    (runs / "lora-rank-garbage").mkdir()
    (runs / "lora-rank-garbage" / "sweep.json").write_text('{"name": "lora-rank", "sweep_')
    (runs / "other-tool").mkdir()
    (runs / "other-tool" / "sweep.json").write_text('{"name": "lora-rank", "owner": "someone else"}')
    extended, lines = start(work, env, "--more", "1")
    assert gates.arrival(3, extended, lines=lines)["stage"] == "lora"
    store.fill()
    gates.open(3)
    extended.wait(timeout=300)
    out = lines.finish()
    assert extended.returncode == 1, out[-4000:]
    for bad in ("lora-rank-garbage", "other-tool"):
        assert f"skipping {runs / bad / 'sweep.json'}: not a readable fluxtune sweep file" in out
    assert (f": refusing stage checkpoint {shared}: {WEIGHTS} does not match the sha256 in its progress.json "
            "(changed or corrupted since it was written); it is not used") in out, out[-6000:]
    stopped = "no space to write stage checkpoint" if store.tmpfs else "cannot write stage checkpoint"
    assert stopped in out and "the sweep stopped" in out and "--resume" in out, out[-4000:]
    record = sweep_record(runs)
    assert record["status"] == "interrupted" and stopped in record["stopped_by"]
    assert left_behind(folder) == []
    statuses = {r.info.status for r in client(work).search_runs(
        [client(work).get_experiment_by_name("lora-rank").experiment_id])}
    assert "RUNNING" not in statuses

    # 3. Room again: --resume finishes the third trial, registers it by reference, and it loads.
    store.free()
    resumed, lines = start(work, env, "--resume")
    assert gates.arrival(4, resumed, lines=lines)["stage"] == "lora"
    gates.open(4)
    out = finish(resumed, lines)
    record = sweep_record(runs)
    assert record["status"] == "finished" and len(record["trials"]) == 3
    [third] = set(record["trials"]) - {nan_trial["trial"], good["trial"]}
    assert record["trials"][third]["val_loss"] == 0.001
    assert "registered model 'flux-fill-lora' version 1" in out, out[-6000:]
    version = client(work).get_model_version_by_alias("flux-fill-lora", "candidate")
    assert version.tags["trial"] == third and version.tags["metric.val_loss"] == "0.001"
    assert sorted(study_states(work, sweep_id)) == ["COMPLETE", "COMPLETE", "FAIL"]
    [base] = record["pinned"]
    assert base != shared and third in base and (Path(base) / WEIGHTS).exists()
    assert weight_files(folder) == sorted([Path(shared) / WEIGHTS, Path(base) / WEIGHTS])  # reused; registered
    assert left_behind(folder) == []

    import mlflow.pyfunc

    from fluxtune.version_contents import RegisteredBaseError

    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    assert mlflow.pyfunc.load_model("models:/flux-fill-lora@candidate") is not None
    (Path(base) / WEIGHTS).rename(Path(base) / "moved")
    with pytest.raises(RegisteredBaseError, match=f"is gone: {Path(base) / WEIGHTS} no longer exists"):
        mlflow.pyfunc.load_model("models:/flux-fill-lora@candidate")
    nothing = run_cli(["search", "sweep.yaml", "--resume"], cwd=work, env=env, timeout=120)
    assert nothing.returncode == 2 and "no unfinished sweep named 'lora-rank'" in nothing.stderr
