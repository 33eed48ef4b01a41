"""Trials that ASHA stops end their Ray Train run at once, so later trials get the CPUs (no hang), and they say so:
in MLflow (a tag and the run's note), on the console and in the summary.

Without fluxtune.train.stops a stopped trial's run blocks on its next report forever and keeps its worker's
CPU; with one CPU per trial on a small local Ray, the sweep then never finishes.
"""

from __future__ import annotations

import pytest

from asha import STEPS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sweep(asha_sweep):
    assert asha_sweep.result.returncode == 0, asha_sweep.failure()
    return asha_sweep


def test_stopped_trials_free_their_workers_and_the_sweep_finishes(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    trials = sweep.trial_runs()
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    last_steps = {t.data.params["stages.full.optimizer.lr"]: max(m.step for m in client.get_metric_history(
        t.info.run_id, "loss")) for t in trials}
    assert any(step < STEPS - 1 for step in last_steps.values()), f"ASHA stopped no trial: {last_steps}"
    assert any(step == STEPS - 1 for step in last_steps.values()), f"no trial ran to the end: {last_steps}"


def test_a_stopped_trial_says_by_whom_and_when_in_mlflow(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    by_status = {}
    for run in sweep.trial_runs():
        by_status.setdefault(run.data.tags["fluxtune.status"], []).append(run)
        last = max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
        assert run.info.run_name.startswith("lr")  # named by its sampled learning rate, not trial-<hex>
        if run.data.tags["fluxtune.status"] == "stopped":
            assert run.data.tags["fluxtune.stopped_by"] == "asha"
            assert run.data.tags["fluxtune.stopped_at_step"] == str(last) and last < STEPS
            assert f"at step {last} of {STEPS}" in run.data.tags["mlflow.note.content"]
        else:
            assert last == STEPS and "mlflow.note.content" not in run.data.tags
    assert by_status.get("stopped") and by_status.get("finished"), by_status


def test_the_console_shows_progress_and_the_summary_without_library_chatter(sweep):
    out, err = sweep.result.stdout, sweep.result.stderr
    assert "stopped early: " in out and "asha stopped it at step" in out  # the progress line of the stopped trial
    assert "trials of 2: 0 running" in out  # the status line after each trial, as a log file shows it
    row = next(line for line in out.splitlines() if "stopped early at step" in line and "│" in line)
    assert row.strip().startswith("│ lr")  # a row of the summary table, one line long
    for chatter in ("Creating initial MLflow database tables", "Starting execution of Dataset",
                    "Token authentication is enabled", "Successfully registered model", "Add type hints",
                    "INFO ", "Failed to load CPU gemm_4bit_forward", "performance bottleneck", "(raylet)"):
        assert chatter not in out + err, chatter
