"""The driver's side of a sweep's stage checkpoints: offer finished stages for reuse, and keep only what is
needed (`checkpoints: {keep: needed}`, the default; `keep: all` prunes nothing).

Needed are: resume (a trial's latest checkpoint, and the one before it while the latest holds an adapter:
that pair is what a version would be made of), registration (the release of the best `register_top`
publishable trials, and every base a registered version references: `SweepFile.pinned`) and stage reuse
(every offered stage while the run goes on; once it has finished, the stages another trial did start from).
Everything else loses its transformer weights as the sweep goes (`fluxtune.checkpoints.prune_weights`: the
manifest says so; exports such as adapters stay). A full-size FLUX.1-Fill checkpoint is ≈48 GB in fp32.
"""

from __future__ import annotations

from typing import Any, Callable

from ray import tune

from fluxtune import storage
from fluxtune.checkpoints import prune_weights
from fluxtune.config.schedule import planned_steps
from fluxtune.search.best import read_stage, release_for
from fluxtune.search.guard import SweepGuard, not_finite_reason, storage_fault
from fluxtune.search.ranking import TrialRanking, publishable
from fluxtune.search.space import StudyUnreadable
from fluxtune.train.protocol import SweepLayout, TrialReport
from fluxtune.train.trial import TrialSettings, offer_stage_for_reuse
from fluxtune.version_contents import StageCheckpoint


class CheckpointKeeper(tune.Callback):
    def __init__(self, settings: TrialSettings, sweep_file: Any, ranking: TrialRanking, keep: str, register_top: int,
                 guard: SweepGuard, experiment_of: Callable[[dict[str, Any]], dict[str, Any]],
                 announce: Callable[[str], None]):
        self.settings, self.ranking, self.metric, self.keep = settings, ranking, ranking.metric, keep
        self.register_top, self.guard = register_top, guard
        self.experiment_of, self.announce = experiment_of, announce
        self.sweep_file = sweep_file  # SweepFile: earlier trials (rows) and pinned checkpoints
        self.rows: dict[str, dict[str, Any]] = dict(sweep_file.trials)  # finished trials, earlier runs included
        self.own: dict[str, list[StageCheckpoint]] = {}  # trial → its own checkpoints that still have weights
        self.offered: set[str] = set(self._offered())  # stage-cache checkpoints
        self.releases: dict[str, list[str]] = {}  # trial → the checkpoints its release needs
        self.announced: set[str] = set()
        self.top: list[dict[str, Any]] | None = None  # the best `register_top` finished trials (None: work it out)
        self.study_warned = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks; the console is not picklable
        return {**self.__dict__, "announce": print, "top": None}

    # -- Tune events
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id not in self.announced:  # stage reuse refused a corrupted checkpoint: say so here
            self.announced.add(trial.trial_id)
            refused = storage.read_json(self.settings.layout.refused_checkpoints(trial.trial_id)) or {}
            for line in refused.get("refused", []):
                self.announce(f"trial {trial.trial_id}: {line}")
        report = TrialReport.from_result(result)
        if not (report.stage_end and report.checkpoint_path):
            return
        checkpoint = storage.qualify(report.checkpoint_path, self.settings.storage_path)
        self._safely(self._stage_end, trial, report, checkpoint)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        steps = TrialReport.from_result(last).global_step
        row = {"trial": trial.trial_id, self.metric: last.get(self.metric), "steps": steps,
               "planned_steps": planned_steps(self.experiment_of(trial.config or {})),
               "error": not_finite_reason(last, self.metric) or ""}
        self.rows[trial.trial_id] = row
        self.top = None  # the searcher told the study before this callback runs: the ranking is current
        self._safely(self._settle)

    # -- what happens
    def _stage_end(self, trial: Any, report: TrialReport, checkpoint: str) -> None:
        finite = not_finite_reason(report.to_result(), self.metric) is None
        if self.settings.reuse_stages and finite:  # never offer NaNs
            offer_stage_for_reuse(self.settings, self.experiment_of(trial.config), int(report.cycle or 0),
                                  str(report.stage),
                                  checkpoint, trial.trial_id, report.global_step)
            self.offered.add(checkpoint)
        if self.keep == "all":
            return
        own = self._own(trial.trial_id)
        stage = read_stage(checkpoint)
        if stage is not None and stage.has_weights and checkpoint not in {c.checkpoint for c in own}:
            own.append(stage)
            # Reports reach the driver after the workers wrote later stages (a busy driver): the first look at the
            # trial's folder may already hold them, so a late report names an older stage. Resume needs the
            # latest by step, not by arrival.
            own.sort(key=lambda s: s.global_step)
        self._prune(trial.trial_id, keep=_resume_set(own))

    def _settle(self) -> None:
        """After a trial ended: the finished trials outside the best `register_top` keep nothing."""
        if self.keep == "all":
            return
        best = {r["trial"] for r in self._top()}
        for trial_id in list(self.own):
            if trial_id in self.rows:  # ended (completed, stopped early or diverged)
                self._prune(trial_id, keep=set(self._release(trial_id)) if trial_id in best else set())

    def finish(self, finished: bool) -> int:
        """At the end of a run: once the sweep has finished, prune every trial folder down to what is needed
        from now on (registration and the stages other trials started from). Returns the bytes freed."""
        if self.keep == "all" or not finished:
            return 0
        needed = set(self.sweep_file.pinned) | self._reused()
        for row in self._top():
            needed.update(self._release(row["trial"]))
        freed = 0
        layout = self.settings.layout
        for run in layout.runs():
            for folder in layout.checkpoints(run):
                if folder not in needed:
                    freed += prune_weights(folder)
        return freed

    # -- helpers
    def _prune(self, trial_id: str, keep: set[str]) -> None:
        protected = keep | set(self.sweep_file.pinned) | self.offered | self._best_releases()
        left = []
        for stage in self._own(trial_id):
            if stage.checkpoint in protected:
                left.append(stage)
            else:
                prune_weights(stage.checkpoint)
        self.own[trial_id] = left

    def _best_releases(self) -> set[str]:
        out: set[str] = set()
        for row in self._top():
            out.update(self._release(row["trial"]))
        return out

    def _top(self) -> list[dict[str, Any]]:
        """The best `register_top` finished trials, in the order publishing follows. When the study cannot be read:
        every publishable one (publishing refuses to guess, and nothing it might need later is pruned)."""
        if self.top is None:
            rows = list(self.rows.values())
            try:
                self.top = self.ranking.best(rows)[:self.register_top]
            except StudyUnreadable as exc:
                if not self.study_warned:
                    self.study_warned = True
                    self.announce(f"{exc}: no finished trial's checkpoints are pruned")
                return [row for row in rows if publishable(row, self.metric)]
        return self.top

    def _release(self, trial_id: str) -> list[str]:
        """The checkpoints whose weights the trial's release needs (`fluxtune.version_contents.Release`)."""
        if trial_id not in self.releases:
            release = release_for(self.settings.storage_path, self.settings.sweep_id, trial_id)
            self.releases[trial_id] = release.weights if release else []
        return self.releases[trial_id]

    def _own(self, trial_id: str) -> list[StageCheckpoint]:
        if trial_id not in self.own:  # first sight in this process: what an earlier one left
            layout = self.settings.layout
            found = [s for s in (read_stage(p) for p in layout.checkpoints(layout.run(trial_id))) if s is not None]
            self.own[trial_id] = sorted((s for s in found if s.has_weights), key=lambda s: s.global_step)
        return self.own[trial_id]

    def _offered(self) -> list[str]:
        cache = self.settings.layout.stage_cache
        return [d["checkpoint"] for d in (storage.read_json(p) for p in storage.list_files(cache, ".json")) if d]

    def _reused(self) -> set[str]:
        used = self.settings.layout.reused_prefixes
        return {d["checkpoint"] for d in (storage.read_json(p) for p in storage.list_files(used, ".json")) if d}

    def _safely(self, action: Callable[..., None], *args: Any) -> None:
        """The driver's own writes: a full or read-only store stops the sweep (resumable), never a traceback."""
        try:
            action(*args)
        except OSError as exc:
            line = storage_fault(f"{exc}") or f"cannot write to {self.settings.storage_path}: {exc}"
            self.guard.note_fault(line)


def _resume_set(own: list[StageCheckpoint]) -> set[str]:
    """A running trial's latest checkpoint, and the one before it while the latest holds an adapter."""
    if not own:
        return set()
    keep = {own[-1].checkpoint}
    if own[-1].has_adapter and len(own) > 1:
        keep.add(own[-2].checkpoint)
    return keep


def remove_incomplete(root: str) -> int:
    """Remove stage-checkpoint folders without a complete marker (a copy into storage cut short by a full or
    read-only store), once no trial runs. Nothing ever reads them; they only hold space. Returns how many."""
    import logging

    from fluxtune.checkpoints import read_checkpoint_manifest

    removed = 0
    quiet = logging.getLogger("fluxtune.checkpoints")
    layout = SweepLayout(sweep_id="", storage=root)  # every run under `root`, whichever sweep named it
    for run in layout.runs():
        for folder in layout.checkpoints(run):
            level, quiet.level = quiet.level, logging.ERROR  # being removed: no "skipping" warning for it
            try:
                if read_checkpoint_manifest(folder) is not None:
                    continue
                fs, inner = storage.filesystem(folder)
                fs.delete_dir(inner)
                removed += 1
            except OSError:  # a read-only store: it stays, and readers keep skipping it
                pass
            finally:
                quiet.level = level
    return removed


TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints (written in place)


def repair_cut_short(root: str, warn: Callable[[str], None]) -> None:
    """Before resuming: remove checkpoint copies cut short, and Ray Train checkpoint lists that a full store cut
    short (Ray writes that file in place and cannot start the run from a broken one): that trial then starts
    again from its first stage (or a reused prefix), with a warning saying so."""
    import json

    remove_incomplete(root)
    for run in SweepLayout(sweep_id="", storage=root).runs():
        snapshot = storage.join(run, TRAIN_SNAPSHOT)
        if not storage.exists(snapshot):
            continue
        try:
            json.loads(storage.read_bytes(snapshot))
        except ValueError:
            storage.remove(snapshot)
            warn(f"Ray Train's list of checkpoints {snapshot} was cut short (the store ran out of space): that "
                 "trial starts again from its first stage")


def disk_use(root: str) -> tuple[int, int]:
    """(bytes under `root`, transformer weight files among them)."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    weights = [i for i in files if i.path.endswith(".safetensors") and "/transformer/" in i.path]
    return sum(i.size for i in files), len(weights)


__all__ = ["CheckpointKeeper", "disk_use", "publishable"]
