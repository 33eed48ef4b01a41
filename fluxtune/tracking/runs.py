"""The run tree of a sweep: one parent run, one child run per trial, metrics with steps, stage artifacts.

Only the driver writes (Tune callbacks call in here), so a sqlite store never sees concurrent writers.
What a person browsing it sees: trial runs named by their sampled values, nested under the sweep; metric curves
over global steps; one image series (`samples`, a grid per evaluation, from step 0); a `stages.json` table with
one row per finished stage (its speed, validation scores, transition time: single numbers, not curves); a tag and
a note on trials a scheduler stopped early; each trial's end time is when its training ended.
A resumed sweep finds its runs again by tag (`fluxtune.sweep_id` on the parent, `fluxtune.trial_id` on each
child) and keeps writing to them: params are logged once, and metric points at steps already recorded are
skipped, so replayed steps after a restart never show up twice. With a tracking server, writes go through
`fluxtune.tracking.buffer`, so a server outage mid-sweep delays them instead of failing the sweep.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fluxtune import storage
from fluxtune.redact import redact_params, redact_text
from fluxtune.tracking.buffer import BufferedClient, TrackingOffline
from fluxtune.tracking.mlflow_private import latest_steps
from fluxtune.tracking.samples import decode_samples
from fluxtune.tracking.store import client, ensure_experiment, server_uri
from fluxtune.tracking.views import curve_points, draw_loss_curves, stage_row, stopped_note
from fluxtune.train.protocol import TrialReport

BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch
SWEEP_TAG = "fluxtune.sweep_id"
TRIAL_TAG = "fluxtune.trial_id"
NODE_TAG = "fluxtune.node"
CHECKPOINT_TAG = "fluxtune.checkpoint."  # + "cycle0-full": where Ray keeps that stage's transformer
STATUS_TAG = "fluxtune.status"  # finished | stopped | failed: how the trial's training ended
STOPPED_BY_TAG = "fluxtune.stopped_by"  # the scheduler (asha, median) that stopped a trial early
STOPPED_AT_TAG = "fluxtune.stopped_at_step"
TRAINED_UNTIL_TAG = "fluxtune.trained_until"  # ms: when training ended (the run's end time, restored after reuse)
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
STAGES_TABLE = "stages.json"  # one row per finished stage (MLflow table artifact)
IMAGE_KEY = "samples"  # the image series of sample grids


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → {"stages.lora.adapter.rank": "64"}; stages are keyed by name like search paths."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(i, dict) and "name" in i for i in tree):
        for item in tree:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
    else:
        out[prefix.rstrip(".")] = str(tree)[:6000]
    return out


def stage_label(cycle: int, stage: str) -> str:
    return f"cycle{cycle}-{stage}"


class SweepTracker:
    def __init__(self, uri: str, experiment: str, sweep_name: str, upload_checkpoints: bool = False,
                 spill_dir: Path | None = None, warn: Any = None):
        self.uri = uri
        self.spill_dir = spill_dir  # the sweep folder: writes a tracking server missed wait there (buffer.py)
        self.warn = warn
        self._client = None
        self.experiment_id = ensure_experiment(uri, experiment)
        self.sweep_name = sweep_name
        self.upload_checkpoints = upload_checkpoints  # full transformers are GBs: referenced by URI unless asked
        self.parent_run_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self._run_names: set[str] | None = None  # trial run names already used in this sweep
        self._logged_upto: dict[str, dict[str, int]] = {}  # run → metric → last step already in MLflow

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
            if server_uri(self.uri):  # a server can go away mid-sweep: its writes are buffered, never lost
                self._client = BufferedClient(self._client, self.uri, self.spill_dir,
                                              handlers={"loss_curves": self._draw_loss_curves},
                                              on_run_created=self._run_created, warn=self.warn)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the client (locks, sessions) is rebuilt lazily.
        return {**self.__dict__, "_client": None, "warn": None}

    def flush(self) -> bool:
        """Send what a tracking-server outage left buffered; True when everything is in MLflow."""
        return self.client.retry(force=True) if isinstance(self.client, BufferedClient) else True

    def _run_created(self, placeholder: str, run_id: str) -> None:
        """A run created while the server was down now exists: use its real id from here on."""
        if self.parent_run_id == placeholder:
            self.parent_run_id = run_id
        self.trial_runs.update({t: run_id for t, r in self.trial_runs.items() if r == placeholder})
        if placeholder in self._logged_upto:
            self._logged_upto[run_id] = self._logged_upto.pop(placeholder)

    # -- finding runs again
    def find_sweep_run(self) -> str | None:
        return self._find(f"tags.`{SWEEP_TAG}` = '{self.sweep_name}'")

    def find_trial_run(self, trial_id: str) -> str | None:
        """The child run of `trial_id` in this sweep, if an earlier (interrupted) attempt created it."""
        if self.parent_run_id is None:
            return None
        return self._find(f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")

    def _find(self, filter_string: str) -> str | None:
        try:
            runs = self.client.search_runs([self.experiment_id], filter_string, max_results=1,
                                           order_by=["attributes.start_time ASC"])
        except TrackingOffline:  # cannot look: a new run (it would be found next time)
            return None
        return runs[0].info.run_id if runs else None

    def _reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        try:
            run = self.client.get_run(run_id)
        except TrackingOffline:  # unknown while the server is down: replayed steps may show twice
            self._logged_upto.setdefault(run_id, {})
            return
        self._logged_upto[run_id] = latest_steps(run)  # no full history download

    # -- the tree
    def start(self, spec_path: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The sweep's parent run: created once, found again (same sweep name) when the sweep resumes."""
        self.flush()  # what an earlier driver left in the sweep's spill file first, so its runs are found
        existing = self.find_sweep_run()
        if existing is not None:
            self.parent_run_id = existing
            self._reopen(existing)
            for key, value in redact_params(tags).items():  # e.g. the git revision the resumed part ran with
                self.client.set_tag(existing, key, value)
            return existing
        run = self.client.create_run(self.experiment_id, run_name=self.sweep_name,
                                     tags={**redact_params(tags), "fluxtune.kind": "sweep", SWEEP_TAG: self.sweep_name})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, params)
        if spec_path:
            self._log_spec(spec_path)
        return self.parent_run_id

    def _log_spec(self, spec_path: str) -> None:
        """The search file as written, unless it holds secrets: then a redacted copy of the same name."""
        import tempfile

        text = Path(spec_path).read_text()
        redacted = redact_text(text)
        if redacted == text:
            self.client.log_artifact(self.parent_run_id, spec_path)
            return
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / Path(spec_path).name
            copy.write_text(redacted)
            self.client.log_artifact(self.parent_run_id, str(copy))

    def start_trial(self, trial_id: str, params: dict[str, Any], tags: dict[str, str], name: str | None = None) -> str:
        """The trial's child run, named `name` (its sampled values; `-2`, `-3` … when a name repeats)."""
        existing = self.trial_runs.get(trial_id) or self.find_trial_run(trial_id)
        if existing is not None:
            self.trial_runs[trial_id] = existing
            self._reopen(existing)
            return existing
        run = self.client.create_run(
            self.experiment_id, run_name=self._unique_name(redact_text(name or f"trial-{trial_id}")),
            tags={**redact_params(tags), "mlflow.parentRunId": self.parent_run_id, "fluxtune.kind": "trial",
                  TRIAL_TAG: trial_id},
        )
        self.trial_runs[trial_id] = run.info.run_id
        self._logged_upto[run.info.run_id] = {}
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _unique_name(self, name: str) -> str:
        if self._run_names is None:  # a resumed or extended sweep: the names its earlier trials took
            self._run_names = set()
            if self.parent_run_id is not None:
                try:
                    children = self.client.search_runs(
                        [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'", max_results=5000)
                    self._run_names = {r.info.run_name for r in children}
                except TrackingOffline:  # unknown while the server is down: a name may repeat, ids never do
                    pass
        unique, n = name, 1
        while unique in self._run_names:
            n += 1
            unique = f"{name}-{n}"
        self._run_names.add(unique)
        return unique

    def log_sweep_params(self, params: dict[str, Any]) -> None:
        """More params of the sweep's own run (e.g. the data summary), redacted like every other."""
        self._log_params(self.parent_run_id, params)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact_params(flatten(params)).items()]  # secrets never reach MLflow
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    # -- metrics
    def log_metrics(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """Points at steps above what the run already holds (a resumed trial replays a few steps)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        upto = self._logged_upto.setdefault(run_id, {})
        metrics = []
        for key, points in series.items():
            for step, value in sorted(points, key=lambda p: p[0]):
                if int(step) > upto.get(key, -1):
                    metrics.append(Metric(key, float(value), now, int(step)))
                    upto[key] = int(step)
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH])

    def log_result(self, trial_id: str, report: TrialReport) -> None:
        """One Tune result: its buffered per-step metrics, and its scalar metrics at the result's step (among them
        the `system/*` sample rank 0 took on its own node)."""
        run_id = self.trial_runs[trial_id]
        series = {k: [tuple(p) for p in v] for k, v in json.loads(report.step_metrics or "{}").items()}
        step = report.global_step
        for key, points in {k: [(step, v)] for k, v in curve_points(report).items()}.items():
            series.setdefault(key, []).extend(points)
        self.log_metrics(run_id, series)

    # -- artifacts
    def log_samples(self, trial_id: str, encoded: str | None, step: int) -> list[int]:
        """Sample-image grids from the worker → the run's `samples` image series (the UI's image slider), each
        at its own step, else the report's, the last one of a step. Stored once by MLflow (`images/`, with a
        compressed preview). Returns the steps logged."""
        import io

        from PIL import Image

        run_id = self.trial_runs[trial_id]
        # One grid per step: a stage end can carry two (the adapter's own evaluation before merging, then the
        # merged model's, which is what the stage ends with); the UI shows one per step.
        by_step = {step if own_step is None else own_step: png for own_step, png in decode_samples(encoded)}
        for at, png in by_step.items():
            with Image.open(io.BytesIO(png)) as image:
                self.client.log_image(run_id, image.copy(), key=IMAGE_KEY, step=at)
        return list(by_step)

    def log_stage_summary(self, trial_id: str, report: TrialReport) -> dict[str, Any]:
        """A stage-end report → one row of the trial's `stages.json` table (cycle, stage, global step, every
        number the stage reported: speed, transition time, validation scores). Returns the row."""
        row = stage_row(report)
        self.client.log_table(self.trial_runs[trial_id], data={k: [v] for k, v in row.items()},
                              artifact_file=STAGES_TABLE)  # appends: a table artifact grows a row per stage
        return row

    def log_stage(self, trial_id: str, checkpoint_dir: str, cycle: int, stage: str, node: str = "") -> None:
        """A stage checkpoint: its exports (adapters) as artifacts; the transformer by URI unless uploads are on.
        `node`: the Ray node of the trial's rank-0 worker (where to look for its logs on a cluster)."""
        run_id = self.trial_runs[trial_id]
        label = stage_label(cycle, stage)
        self.client.set_tag(run_id, CHECKPOINT_TAG + label, _as_uri(checkpoint_dir))
        if node:
            self.client.set_tag(run_id, NODE_TAG, node)
        uploads = [("exports", f"stages/{label}")]
        if self.upload_checkpoints:
            uploads.append(("transformer", f"stages/{label}/transformer"))
        for part, artifact_path in uploads:  # on a shared URI only these parts are downloaded, never the rest
            if storage.exists(storage.join(checkpoint_dir, part)):
                with storage.local_copy(storage.join(checkpoint_dir, part)) as local:
                    self.client.log_artifacts(run_id, str(local), artifact_path=artifact_path)

    def log_loss_curves(self, trial_id: str) -> None:
        """loss_curves.png: training loss and validation loss over global steps (once the server answers)."""
        if isinstance(self.client, BufferedClient):
            self.client.defer("loss_curves", self.trial_runs[trial_id], trial_id)
        else:
            self._draw_loss_curves(self.trial_runs[trial_id], trial_id)

    def _draw_loss_curves(self, run_id: str, trial_id: str) -> None:
        draw_loss_curves(self.client, run_id, f"trial {trial_id}")

    def stage_checkpoints(self, trial_id: str) -> list[tuple[int, str, str]]:
        """(cycle, stage, local path) of every stage checkpoint the trial's run references, oldest first: a
        resumed sweep's driver knows the stages finished before the restart from these tags."""
        try:
            tags = self.client.get_run(self.trial_runs[trial_id]).data.tags
        except TrackingOffline:  # unknown for now: the driver records stages from here on
            return []
        found = []
        for key, value in tags.items():
            if key.startswith(CHECKPOINT_TAG):
                cycle, stage = key.removeprefix(CHECKPOINT_TAG).removeprefix("cycle").split("-", 1)
                path = value.removeprefix("file://") if value.startswith("file://") else value
                found.append((int(cycle), stage, path))
        return sorted(found, key=lambda item: item[2])  # Ray names checkpoints by time

    # -- endings
    def end_trial(self, trial_id: str, status: str, stopped: tuple[str, int, int] | None = None) -> None:
        """The trial's training ended (FINISHED or FAILED); `stopped`: (scheduler, step, planned steps) when a
        scheduler ended it early. Its end time is kept in a tag: registering the trial later reopens its run."""
        if trial_id not in self.trial_runs:
            return
        run_id = self.trial_runs[trial_id]
        ended = int(time.time() * 1000)
        how = "failed" if status == "FAILED" else ("stopped" if stopped else "finished")
        self.client.set_tag(run_id, STATUS_TAG, how)
        if stopped:
            scheduler, step, planned = stopped
            self.client.set_tag(run_id, STOPPED_BY_TAG, scheduler)
            self.client.set_tag(run_id, STOPPED_AT_TAG, str(step))
            self.client.set_tag(run_id, NOTE_TAG, stopped_note(scheduler, step, planned))
        self.client.set_tag(run_id, TRAINED_UNTIL_TAG, str(ended))
        self.client.set_terminated(run_id, status=status, end_time=ended)

    def restore_trial_ends(self) -> None:
        """Trial runs reopened after their training (registration logs the model into the run) end again when
        their training did, so the UI's durations are training times, not the whole sweep."""
        for run_id in self.trial_runs.values():
            try:
                run = self.client.get_run(run_id)
            except TrackingOffline:  # the buffered end time is already right
                return
            ended = run.data.tags.get(TRAINED_UNTIL_TAG)
            if ended and run.info.end_time != int(ended) and run.info.status != "RUNNING":
                self.client.set_terminated(run_id, status=run.info.status, end_time=int(ended))

    def finish(self, status: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self.restore_trial_ends()
        for key, value in tags.items():
            self.client.set_tag(self.parent_run_id, key, value)
        if metrics:
            self.log_metrics(self.parent_run_id, {k: [(0, v)] for k, v in metrics.items()})
        self.client.set_terminated(self.parent_run_id, status=status)
        if isinstance(self.client, BufferedClient):
            self.client.close()  # a last try; else a warning says what is not logged and where it is kept


def _as_uri(path: str) -> str:
    return path if "://" in path else Path(path).resolve().as_uri()
