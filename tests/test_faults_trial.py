"""A trial that fails in training says where and who in one console line, and keeps its full error.

In-process (no Ray): an exception leaving a stage carries its site (stage, cycle, step, the registered component
whose code raised, with its plugin's distribution==version), which the driver reads back from the error text and
turns into the console line. End to end (Ray, MLflow): `fluxtune run` with a plugin whose loss raises prints that
line and no Ray traceback, keeps the error under runs/<sweep>/errors/, and logs it to the trial's MLflow run.
"""

from __future__ import annotations

import json
import textwrap
import traceback
import types

import pytest

import fluxtune
from fluxtune.api import Params
from fluxtune.failures import TrialFailure, keep_trial_failure, trial_failure_line
from fluxtune.testing import registered_plugin, run_tiny

STAGES = """
stages:
  - {name: full, type: full, steps: 3, optimizer: {lr: 1.0e-4}}
  - {name: lora, type: lora, steps: 4, adapter: {type: lora, rank: 2}}
"""


class BoomParams(Params):
    at_step: int = 2
    stage: str = "lora"


def _exploding_loss(params: BoomParams):
    calls = {"n": 0}

    def loss(pred, target, batch):
        calls["n"] += 1
        if calls["n"] > params.at_step:
            raise FloatingPointError("the loss exploded")
        return (pred.float() - target.float()).pow(2).mean()
    return loss


class FailingCallback:
    def __init__(self, params: BoomParams):
        self.params = params

    def on_stage_end(self, ctx, metrics):
        if ctx.name == self.params.stage:
            raise OSError("no space left to write the stage report")


class LoseData:
    def __init__(self, params: BoomParams):
        self.params = params

    def on_stage_start(self, ctx):
        if ctx.name == self.params.stage:
            ctx.shared.train = None


def _plugin():
    plugin = types.ModuleType("boom_plugin")

    @fluxtune.hookimpl
    def register_losses(register):
        register("exploding", _exploding_loss, params=BoomParams, doc="raises after at_step calls")

    @fluxtune.hookimpl
    def register_callbacks(register):
        register("full_disk", FailingCallback, params=BoomParams, doc="raises at a stage end")
        register("lose_data", LoseData, params=BoomParams, doc="breaks the training set at a stage start")

    plugin.register_losses, plugin.register_callbacks = register_losses, register_callbacks
    return plugin


def _failure_of(base_yaml: str) -> TrialFailure:
    with registered_plugin(_plugin(), name="boom"):
        with pytest.raises(Exception) as caught:
            run_tiny(base_yaml)
    return TrialFailure.from_text("".join(traceback.format_exception(caught.value)))


def test_an_error_in_a_plugin_loss_names_the_stage_cycle_step_and_the_plugin():
    failure = _failure_of(STAGES + "loss: {type: exploding, at_step: 5}\n")  # full: 3 steps, lora: 2, then 6th

    site = failure.site
    assert (site.stage, site.cycle, site.phase, site.step) == ("lora", 0, "training", 6)
    assert site.component == "loss 'exploding' of plugin 'boom' (<in-process>==0)"
    assert failure.error == "FloatingPointError: the loss exploded"
    line = trial_failure_line("abc_00001", failure, "runs/s/errors/trial-abc_00001.txt")
    assert line == ("trial abc_00001 failed in stage 'lora' cycle 0 step 6, raised by loss 'exploding' of plugin "
                    "'boom' (<in-process>==0): FloatingPointError: the loss exploded "
                    "(full error: runs/s/errors/trial-abc_00001.txt)")


def test_an_error_at_a_stage_end_names_the_callback_and_the_last_step():
    failure = _failure_of(STAGES + "callbacks: [{type: full_disk, stage: full}]\n")

    site = failure.site
    assert (site.stage, site.phase, site.step) == ("full", "stage end", 3)
    assert site.component == "callback 'full_disk' of plugin 'boom' (<in-process>==0)"
    assert "after step 3" in trial_failure_line("t", failure, None)


def test_an_error_in_fluxtune_code_names_the_built_in_stage_it_ran_in():
    # the callback only breaks the training set at the lora stage's start; fluxtune's own batching then raises
    failure = _failure_of(STAGES + "callbacks: [{type: lose_data, stage: lora}]\n")

    site = failure.site
    assert (site.stage, site.phase, site.step) == ("lora", "training", 4)
    assert site.component == f"stage 'lora' (built-in, fluxtune=={fluxtune.__version__})"


def test_error_text_without_a_site_gives_its_innermost_exception_line():
    text = textwrap.dedent("""\
        Failure # 1 (occurred at 2026-11-30_12-00-00)
        ray.exceptions.RayTaskError(TrainingFailedError): ray::run_trial() (pid=1, ip=127.0.0.1)
          File "worker.py", line 3, in train
        RuntimeError: worker 0 got no training examples
        ray.train.TrainingFailedError: Training failed due to worker errors
        """)
    failure = TrialFailure.from_text(text)
    assert failure.site is None and failure.error == "RuntimeError: worker 0 got no training examples"
    assert trial_failure_line("t1", failure, None) == "trial t1 failed: RuntimeError: worker 0 got no training examples"


def test_a_failed_trials_error_is_kept_in_the_sweep_folder_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    error_file = tmp_path / "ray-temp" / "error.txt"
    error_file.parent.mkdir()
    error_file.write_text("Traceback ...\nValueError: bad token hf_secretsecretsecret\n")
    trial = types.SimpleNamespace(trial_id="t_00002", error_file=str(error_file), get_error=lambda: None)

    failure, kept = keep_trial_failure(trial, tmp_path / "sweep")

    assert kept == tmp_path / "sweep" / "errors" / "trial-t_00002.txt"
    assert "hf_secret" not in kept.read_text() and "ValueError: bad token ***" in kept.read_text()
    error_file.unlink()  # Ray's temp folder is gone once the command exits: the kept copy stays
    assert kept.exists() and failure.error.startswith("ValueError: bad token")


EXPLODING_PLUGIN = """
    import fluxtune
    from fluxtune.api import Params


    class P(Params):
        at_step: int = 3


    def build(params):
        calls = {"n": 0}

        def loss(pred, target, batch):
            calls["n"] += 1
            if calls["n"] > params.at_step:
                raise FloatingPointError("the loss exploded")
            return (pred.float() - target.float()).pow(2).mean()
        return loss


    @fluxtune.hookimpl
    def register_losses(register):
        register("exploding", build, params=P, doc="raises after at_step calls")
"""

SPEC = """\
name: failing-trial
base:
  data: {jsonl: sample, resolution: 32, sample_size: 16, batch_size: 2}  # the fault chains' data: their latent cache
  eval_every: 100
  loss: {type: exploding, at_step: 3}
  stages:
    - {name: full, type: full, steps: 2, optimizer: {lr: 1.0e-4}}
    - {name: lora, type: lora, steps: 4, adapter: {type: lora, rank: 2}}
search: {max_failures: 0}  # a retried worker group is the fault chain's (tests/test_faults.py): fail at once
tracking: {experiment: failing-trial}
"""


@pytest.mark.e2e
def test_a_trial_failing_in_training_is_one_line_and_its_error_is_kept(tmp_path, cli_env):
    from conftest import run_cli
    from test_bad_inputs import fake_install

    fake_install(tmp_path / "site", "fluxtune-exploding", "exploding", EXPLODING_PLUGIN)
    env = {**cli_env, "PYTHONPATH": f"{tmp_path / 'site'}:{cli_env.get('PYTHONPATH', '')}".rstrip(":")}
    (tmp_path / "spec.yaml").write_text(SPEC)

    result = run_cli(["run", "spec.yaml"], cwd=tmp_path, env=env, timeout=600)

    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and "RayTaskError" not in out, out
    lines = [line for line in out.splitlines() if " failed in stage " in line]
    assert len(lines) == 1, out
    line = lines[0]
    # the loss raises at its 4th call: the lora stage's 2nd step, global step 4
    assert ("failed in stage 'lora' cycle 0 step 4, raised by loss 'exploding' of plugin 'exploding' "
            "(fluxtune-exploding==1.0): FloatingPointError: the loss exploded (full error: ") in line, out
    [kept] = list((tmp_path / "runs").glob("failing-trial-*/errors/trial-*.txt"))
    assert str(kept) in line and "the loss exploded" in kept.read_text()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("failing-trial")
    [trial_run] = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert trial_run.info.status == "FAILED"
    assert "loss 'exploding'" in trial_run.data.tags["fluxtune.error"]
    assert [a.path for a in client.list_artifacts(trial_run.info.run_id, "error")] == [f"error/{kept.name}"]
    assert json.loads((kept.parent.parent / "sweep.json").read_text())["trials"]
