"""The worker→driver protocol: what a worker's reporter writes is what the driver's readers get back, and one
SweepLayout answers every path of a sweep folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from fluxtune.search.callbacks import stopped_early
from fluxtune.search.sweep_file import SweepFile
from fluxtune.tracking.samples import decode_samples
from fluxtune.tracking.views import curve_points, stage_row
from fluxtune.train.protocol import (CHECKPOINT_PATH_KEY, CYCLE_KEY, DONE_KEY, GLOBAL_STEP_KEY, RESUMED_FROM_KEY,
                                     STAGE_END_KEY, STAGE_KEY, STEP_METRICS_KEY, TRIAL_ID_KEY, WORKER_FAILURES_KEY,
                                     SweepLayout, TrialReport)
from fluxtune.train.reporter import RayReporter
from fluxtune.train.trial import TrialSettings


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_stage_end_report_reads_back_as_the_worker_wrote_it():
    reporter = RayReporter(rank=0)  # rank 0: Tune forwards its reports (with its node's `system/*` sample)
    reporter.log(10, {"loss": 0.5})
    reporter.log(11, {"loss": 0.4})
    png = _png()
    reporter.attach_sample(png)
    # As the cycle hands a stage end to its reporter (cycle and stage among the metrics), on a restarted attempt.
    wire = reporter._report(12, {"val_loss": 0.3, "lora/cycle1/val_loss": 0.3, "samples_per_s": 7.0,
                                 CYCLE_KEY: 1, STAGE_KEY: "lora", RESUMED_FROM_KEY: 8}, stage_end=True, node="n-1")
    # What Train's controller and Tune add on the way to the driver's callbacks.
    result = {**wire, WORKER_FAILURES_KEY: 1, CHECKPOINT_PATH_KEY: "/runs/s/train/s-t1/checkpoint_000002",
              TRIAL_ID_KEY: "t1", DONE_KEY: True, "training_iteration": 3}

    report = TrialReport.from_result(result)
    assert (report.global_step, report.stage_end, report.cycle, report.stage, report.node) == (12, True, 1, "lora", "n-1")
    assert (report.resumed_from, report.worker_failures, report.trial_id) == (8, 1, "t1")
    assert report.checkpoint_path == "/runs/s/train/s-t1/checkpoint_000002" and report.done
    assert json.loads(report.step_metrics) == {"loss": [[10, 0.5], [11, 0.4]]}
    assert decode_samples(report.samples) == [(None, png)]
    assert report.value("val_loss") == 0.3 and report.where() == "cycle 1 lora"
    assert report.to_result() == result  # the view loses nothing Tune carries

    # The readers: MLflow's curves and stage table, the console's early-stop note.
    curves = {k: v for k, v in curve_points(report).items() if not k.startswith("system/")}
    assert curves == {"val_loss": 0.3, RESUMED_FROM_KEY: 8, WORKER_FAILURES_KEY: 1}
    row = stage_row(report)
    assert (row[CYCLE_KEY], row[STAGE_KEY], row[GLOBAL_STEP_KEY], row["samples_per_s"]) == (1, "lora", 12, 7.0)
    assert not {"lora/cycle1/val_loss", "training_iteration", "system/cpu_utilization_percentage"} & set(row)
    stopped = stopped_early(report, "asha", planned=40)
    assert stopped is not None and (stopped.step, stopped.planned) == (12, 40)
    assert stopped_early(report, "asha", planned=12) is None  # it ran to its end


def test_an_evaluation_report_carries_no_stage_keys():
    wire = RayReporter(rank=1)._report(4, {"val_loss": 0.25})
    assert set(wire) == {"val_loss", GLOBAL_STEP_KEY, STEP_METRICS_KEY}  # no stage_end, cycle, node or samples
    report = TrialReport.from_result(wire)
    assert not report.stage_end and report.cycle is None and report.samples is None
    assert report.where() == "cycle ?" and curve_points(report) == {"val_loss": 0.25}


def test_the_report_keys_keep_their_names_on_the_wire():
    """Tune's saved state of a sweep being resumed, the schedulers' time attribute and MLflow metric names of
    earlier trials all use these names: renaming one breaks `--resume` and `--more` of existing sweeps."""
    assert (GLOBAL_STEP_KEY, STAGE_END_KEY, CYCLE_KEY, STAGE_KEY, STEP_METRICS_KEY) == (
        "global_step", "stage_end", "cycle", "stage", "fluxtune_steps")
    assert (RESUMED_FROM_KEY, WORKER_FAILURES_KEY, CHECKPOINT_PATH_KEY) == (
        "resumed_from_step", "worker_failures", "checkpoint_path")


def test_a_local_sweep_folder_holds_both_sides(tmp_path):
    folder = tmp_path / "runs" / "lora-rank-20260101-000000-abc123"
    layout = SweepLayout.at(folder)
    assert layout.sweep_id == "lora-rank-20260101-000000-abc123"
    assert (layout.sweep_json, layout.best_yaml, layout.errors, layout.lock) == (
        folder / "sweep.json", folder / "best.yaml", folder / "errors", folder / ".lock")
    assert layout.run("t1") == str(folder / "train" / f"{layout.sweep_id}-t1")
    assert layout.reusable_stage("k") == str(folder / "stage_cache" / "k.json")
    assert layout.reused_prefix("t1") == str(folder / "stage_cache" / "used" / "t1.json")
    assert layout.refused_checkpoints("t1") == str(folder / "stage_cache" / "refused" / "t1.json")
    assert layout.tune_run("more-1") == str(folder / "tune" / "more-1")
    # The sweep file and the trials' settings ask the same object.
    assert SweepFile(name="lora-rank", sweep_id=layout.sweep_id, folder=str(folder), fingerprint="f").path == layout.sweep_json
    settings = TrialSettings(sweep_id=layout.sweep_id, base={}, jsonl="", storage_path=str(folder), plugins={})
    assert settings.layout == layout


def test_on_a_cluster_the_trials_side_is_on_the_shared_uri(tmp_path):
    shared = "s3://bucket/runs/s-1?endpoint_override=localhost:9000"
    layout = SweepLayout("s-1", shared, folder=str(tmp_path / "s-1"))
    assert layout.sweep_json == tmp_path / "s-1" / "sweep.json"  # the driver's files stay on its disk
    assert layout.run("t1") == "s3://bucket/runs/s-1/train/s-1-t1?endpoint_override=localhost:9000"
    assert layout.reused_prefix("t1") == "s3://bucket/runs/s-1/stage_cache/used/t1.json?endpoint_override=localhost:9000"


def test_a_runs_checkpoints_are_its_checkpoint_folders_only(tmp_path):
    layout = SweepLayout.at(tmp_path / "s-1")
    run = Path(layout.run("t1"))
    for name in ("checkpoint_000001", "checkpoint_000000"):
        (run / name).mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's list: a file, not a checkpoint
    assert layout.runs() == [str(run)]
    assert layout.checkpoints(str(run)) == [str(run / "checkpoint_000000"), str(run / "checkpoint_000001")]
