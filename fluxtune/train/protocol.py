"""What a trial's workers tell the driver, and where a sweep keeps its files: named once, read everywhere.

A worker's report is the dict Ray Tune carries (`ray.train.report`); Train's controller and Tune add their own
keys on the way. `TrialReport` is the typed view of that dict: the worker's reporter builds one and sends
`to_result()`, the driver's callbacks read `TrialReport.from_result(result)`. `SweepLayout` answers every path of
`runs/<sweep>/…`. Plain Python (no Ray, no MLflow), so MLflow views and `fluxtune.failures` (below `train`) read it
too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxtune import storage

# -- report keys a worker sends
GLOBAL_STEP_KEY = "global_step"  # with every report: the trial's step across stages and cycles (schedulers' time)
STAGE_END_KEY = "stage_end"  # True on the report of a finished stage (it carries the stage checkpoint)
CYCLE_KEY = "cycle"  # at stage ends: the cycle of the finished stage
STAGE_KEY = "stage"  # at stage ends: the name of the finished stage
STEP_METRICS_KEY = "fluxtune_steps"  # JSON: {metric: [[step, value], ...]}, unpacked by the tracking callback
SAMPLES_KEY = "fluxtune_samples"  # JSON list of base64 PNGs (fluxtune.tracking.samples), unpacked likewise
NODE_KEY = "node"  # the Ray node id of rank 0, sent at stage ends: which machine of a cluster ran the trial
RESUMED_FROM_KEY = "resumed_from_step"  # with every report of an attempt that restarted from its own checkpoint
# -- added by Train's controller (fluxtune.train.trial.FailureCountingReport) after a worker failure
WORKER_FAILURES_KEY = "worker_failures"  # how many this Train run had
LAST_FAILURE_KEY = "last_worker_failure"  # which rank failed and how (text)
# -- added by Ray
CHECKPOINT_PATH_KEY = "checkpoint_path"  # where Train stored the report's checkpoint (TuneReportCallback)
TRIAL_ID_KEY = "trial_id"  # Tune's trial id
DONE_KEY = "done"  # Tune: the trial's last result (a scheduler stopped it, or it ended)

PROTOCOL_KEYS = frozenset({GLOBAL_STEP_KEY, STAGE_END_KEY, CYCLE_KEY, STAGE_KEY, STEP_METRICS_KEY, SAMPLES_KEY,
                           NODE_KEY, RESUMED_FROM_KEY, WORKER_FAILURES_KEY, LAST_FAILURE_KEY, CHECKPOINT_PATH_KEY,
                           TRIAL_ID_KEY, DONE_KEY})


@dataclass(frozen=True)
class TrialReport:
    """One report of a trial, typed. `metrics` holds everything else: what the stages reported by name (val_loss,
    speeds, `<stage>/cycle<n>/…` summaries, `system/*`) and, on the driver, Tune's bookkeeping."""

    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    stage_end: bool = False
    cycle: int | None = None
    stage: str | None = None
    step_metrics: str | None = None
    samples: str | None = None
    node: str | None = None
    resumed_from: int | None = None
    worker_failures: int | None = None
    last_failure: str | None = None
    checkpoint_path: str | None = None
    trial_id: str | None = None
    done: bool = False

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> "TrialReport":
        """The report in a result dict (a worker's metrics, or what Tune hands its callbacks)."""
        def number(key: str) -> int | None:
            return int(result[key]) if result.get(key) is not None else None

        def text(key: str) -> str | None:
            return str(result[key]) if result.get(key) is not None else None

        return cls(global_step=int(result.get(GLOBAL_STEP_KEY) or 0),
                   metrics={k: v for k, v in result.items() if k not in PROTOCOL_KEYS},
                   stage_end=bool(result.get(STAGE_END_KEY)), cycle=number(CYCLE_KEY), stage=text(STAGE_KEY),
                   step_metrics=text(STEP_METRICS_KEY), samples=text(SAMPLES_KEY), node=text(NODE_KEY),
                   resumed_from=number(RESUMED_FROM_KEY), worker_failures=number(WORKER_FAILURES_KEY),
                   last_failure=text(LAST_FAILURE_KEY), checkpoint_path=text(CHECKPOINT_PATH_KEY),
                   trial_id=text(TRIAL_ID_KEY), done=bool(result.get(DONE_KEY)))

    @classmethod
    def from_worker(cls, global_step: int, metrics: dict[str, Any], **fields: Any) -> "TrialReport":
        """A worker's report: `metrics` as the cycle hands them to its reporter (a stage end's carry `cycle` and
        `stage`, a restarted attempt's its `resumed_from_step`), plus the reporter's own `fields`."""
        return replace(cls.from_result(metrics), global_step=global_step, **fields)

    def to_result(self) -> dict[str, Any]:
        """The dict that crosses the Ray boundary; a key that is not set is left out (an evaluation's report has
        no `stage_end`, `cycle` or `node`)."""
        out = dict(self.metrics)
        out[GLOBAL_STEP_KEY] = self.global_step
        optional = [(STAGE_END_KEY, self.stage_end or None), (CYCLE_KEY, self.cycle), (STAGE_KEY, self.stage),
                    (STEP_METRICS_KEY, self.step_metrics), (SAMPLES_KEY, self.samples), (NODE_KEY, self.node),
                    (RESUMED_FROM_KEY, self.resumed_from), (WORKER_FAILURES_KEY, self.worker_failures),
                    (LAST_FAILURE_KEY, self.last_failure), (CHECKPOINT_PATH_KEY, self.checkpoint_path),
                    (TRIAL_ID_KEY, self.trial_id), (DONE_KEY, self.done or None)]
        out.update((key, value) for key, value in optional if value is not None)
        return out

    def value(self, metric: str) -> Any:
        """A reported metric by name (None when this report has none)."""
        return self.metrics.get(metric)

    def attempt_marks(self) -> dict[str, int]:
        """The attempt's facts this report carries (where a restart resumed, how many worker failures): numbers
        MLflow shows as the trial's metrics."""
        marks = {RESUMED_FROM_KEY: self.resumed_from, WORKER_FAILURES_KEY: self.worker_failures}
        return {key: value for key, value in marks.items() if value is not None}

    def where(self) -> str:
        """`cycle 1 lora`: the finished stage, for people; `cycle ?` when the report names none."""
        return f"cycle {'?' if self.cycle is None else self.cycle} {self.stage or ''}".rstrip()


@dataclass(frozen=True)
class SweepLayout:
    """The folders and files of one sweep, `runs/<sweep id>/`.

    The driver's side (`folder`: sweep.json, best.yaml, errors/, the lock) stays on the driver's disk. The trials'
    side (`storage`: Train runs and their stage checkpoints, the stage cache, Tune's state) is the same folder, or
    `<shared URI>/<sweep id>` on a cluster, where every node reaches it.
    """

    sweep_id: str
    storage: str
    folder: str | None = None  # None: the driver's files sit in `storage` (a local sweep)

    SWEEP_JSON = "sweep.json"
    BEST = "best.yaml"
    ERRORS = "errors"
    LOCK = ".lock"
    TRAIN = "train"
    STAGE_CACHE = "stage_cache"
    TUNE = "tune"
    CHECKPOINT_PREFIX = "checkpoint"  # Ray Train's `checkpoint_000003` folders inside a run

    @classmethod
    def at(cls, folder: str | Path) -> "SweepLayout":
        """A local sweep folder (its name is the sweep id)."""
        return cls(sweep_id=Path(folder).name, storage=str(folder))

    # -- the driver's side
    @property
    def driver_folder(self) -> Path:
        return Path(self.folder if self.folder is not None else self.storage)

    @property
    def sweep_json(self) -> Path:
        """`sweep.json` (fluxtune.search.sweep_file.SweepFile)."""
        return self.driver_folder / self.SWEEP_JSON

    @property
    def best_yaml(self) -> Path:
        return self.driver_folder / self.BEST

    @property
    def errors(self) -> Path:
        """Full (redacted) errors: `trial-<id>.txt` and this process's tracebacks."""
        return self.driver_folder / self.ERRORS

    @property
    def lock(self) -> Path:
        return self.driver_folder / self.LOCK

    # -- the trials' side
    @property
    def train(self) -> str:
        """Ray Train's storage: one run folder per trial."""
        return storage.join(self.storage, self.TRAIN)

    def run_name(self, trial_id: str) -> str:
        """The trial's Train run: deterministic, so a restarted trial finds its own stage checkpoints."""
        return f"{self.sweep_id}-{trial_id}"

    def run(self, trial_id: str) -> str:
        return storage.join(self.train, self.run_name(trial_id))

    def runs(self) -> list[str]:
        """Every trial's Train run folder there is."""
        return storage.list_folders(self.train)

    def checkpoints(self, run: str) -> list[str]:
        """The stage-checkpoint folders of a run folder, oldest first."""
        return storage.list_folders(run, self.CHECKPOINT_PREFIX)

    @property
    def stage_cache(self) -> str:
        """Stage reuse: `<key>.json` points at a finished stage checkpoint; `used/<trial>.json` names the prefix a
        trial reused, `refused/<trial>.json` the checkpoints it refused.
        Beside the checkpoints (a shared URI on a cluster), so a trial on any node finds them."""
        return storage.join(self.storage, self.STAGE_CACHE)

    def reusable_stage(self, key: str) -> str:
        return storage.join(self.stage_cache, f"{key}.json")

    @property
    def reused_prefixes(self) -> str:
        return storage.join(self.stage_cache, "used")

    def reused_prefix(self, trial_id: str) -> str:
        """The stage prefix a trial reused (its checkpoint and global step)."""
        return storage.join(self.reused_prefixes, f"{trial_id}.json")

    def refused_checkpoints(self, trial_id: str) -> str:
        """Checkpoints stage reuse refused for this trial (corrupted): the driver shows them."""
        return storage.join(self.stage_cache, "refused", f"{trial_id}.json")

    @property
    def tune(self) -> str:
        """Tune's storage: one experiment folder per run of the sweep (`tune`, then `more-1`, …)."""
        return storage.join(self.storage, self.TUNE)

    def tune_run(self, name: str) -> str:
        return storage.join(self.tune, name)


