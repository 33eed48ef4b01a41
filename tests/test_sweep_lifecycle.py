"""The sweep's bookkeeping, piece by piece (the end-to-end cases are in tests/test_faults.py): which
trials can be published, what Optuna is told, which sweep files are read, which locks refuse, which
checkpoints keep their weights."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from fluxtune.config.errors import InputError
from fluxtune.search.ranking import publishable, ranked
from fluxtune.search.sweep_file import SweepFile
from fluxtune.version_contents import release_of


def row(trial: str, value: float | None, steps: int = 10, planned: int = 10, error: str = "") -> dict:
    return {"trial": trial, "val_loss": value, "steps": steps, "planned_steps": planned, "error": error, "config": {}}


def test_only_complete_finite_trials_are_published_and_nan_is_never_best():
    rows = [row("nan", math.nan), row("inf", -math.inf), row("stopped", 0.1, steps=4), row("failed", 0.2, error="x"),
            row("b", 0.5), row("a", 0.5), row("best", 0.3), row("none", None)]
    assert [r["trial"] for r in ranked(rows, "val_loss", "min")] == ["best", "a", "b"]  # ties: by trial id
    assert [r["trial"] for r in ranked(rows, "val_loss", "max")] == ["a", "b", "best"]
    assert not publishable(row("nan", math.nan), "val_loss") and publishable(row("ok", 0.0), "val_loss")


def test_a_version_is_the_last_adapter_on_the_stage_before_it_or_the_last_full_stage():
    from fluxtune.version_contents import StageCheckpoint

    full = StageCheckpoint("full", 0, 4, "/c/full")
    lora = StageCheckpoint("lora", 0, 8, "/c/lora", has_adapter=True)
    full2 = StageCheckpoint("full2", 1, 12, "/c/full2")
    assert release_of("t", [full, lora]).weights == ["/c/full"] and release_of("t", [full, lora]).adapter == lora
    assert release_of("t", [full, lora, full2]).weights == ["/c/full2"]  # the final transformer is the model
    assert release_of("t", [full, lora, full2]).adapter is None
    assert release_of("t", [lora]).weights == []  # trained on the configured model itself
    assert release_of("t", []) is None


def _study_trials(searcher, count: int) -> list[str]:
    ids = [f"t{i}" for i in range(count)]
    for trial_id in ids:
        searcher.suggest(trial_id)
    return ids


def _searcher(cls, tmp_path: Path):
    from fluxtune.config.load import load_search_text
    from fluxtune.search.guard import FiniteOptunaSearch
    from fluxtune.search.rows import TrialExperiments
    from fluxtune.search.space import DefineByRun, optuna_storage

    spec, base = load_search_text("""\
name: s
base:
  stages: [{name: full, type: full, steps: 2}]
search:
  space: {stages.full.steps: {type: int, low: 1, high: 3}}
""")
    ours = {"planned_steps": TrialExperiments(base).planned_steps} if cls is FiniteOptunaSearch else {}
    return cls(space=DefineByRun(spec.search.space, base), metric="val_loss", mode="min", study_name="s",
               storage=optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), **ours)


def _states(tmp_path: Path) -> list[str]:
    import optuna

    return [t.state.name for t in optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
            .get_trials()]


def test_optuna_learns_only_finite_values_and_an_errored_trial_stays_resumable(tmp_path):
    from fluxtune.search.guard import FiniteOptunaSearch
    from fluxtune.search.space import fail_abandoned

    searcher = _searcher(FiniteOptunaSearch, tmp_path)
    done, diverged, errored = _study_trials(searcher, 3)
    searcher.on_trial_result(diverged, {"val_loss": math.nan, "training_iteration": 1})  # not reported
    searcher.on_trial_complete(done, {"val_loss": 0.5, "global_step": 3})
    searcher.on_trial_complete(diverged, {"val_loss": math.nan})
    searcher.on_trial_complete(errored, {"val_loss": 0.1}, error=True)
    assert _states(tmp_path) == ["COMPLETE", "FAIL", "RUNNING"]  # the errored one: --resume may finish it
    assert fail_abandoned(f"sqlite:///{tmp_path / 'optuna.db'}", "s") == 1  # the end of a finished sweep
    assert _states(tmp_path) == ["COMPLETE", "FAIL", "FAIL"]


def test_rays_optuna_search_still_tells_an_errored_trial_complete(tmp_path):
    """Why FiniteOptunaSearch exists: when this fails, Ray fixed it and the override can go."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = _searcher(OptunaSearch, tmp_path)
    [errored] = _study_trials(searcher, 1)
    searcher.on_trial_complete(errored, {"val_loss": 0.1}, error=True)
    assert _states(tmp_path) == ["COMPLETE"]


def _run(searcher, trial_id: str, value: float, early: bool = False) -> None:
    """A trial through the searcher as Tune drives it: suggested, one finite report, ended at its planned step (or
    one before it, as when a scheduler stops it)."""
    config = searcher.suggest(trial_id)
    planned = config["stages.full.steps"]
    searcher.on_trial_result(trial_id, {"val_loss": value, "training_iteration": 1})
    searcher.on_trial_complete(trial_id, {"val_loss": value, "global_step": planned - 1 if early else planned})


def _trial_states(tmp_path: Path) -> dict[str, tuple[str, float | None]]:
    import optuna

    from fluxtune.search.ranking import TRIAL_ID_ATTR

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    return {t.user_attrs[TRIAL_ID_ATTR]: (t.state.name, t.value) for t in study.get_trials()}


def test_a_trial_stopped_early_is_pruned_in_the_study_and_never_its_best(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from fluxtune.search.guard import FiniteOptunaSearch

    searcher = _searcher(FiniteOptunaSearch, tmp_path)
    _run(searcher, "stopped", 0.05, early=True)  # looked best when ASHA stopped it
    _run(searcher, "done", 0.5)
    assert _trial_states(tmp_path) == {"stopped": ("PRUNED", 0.05), "done": ("COMPLETE", 0.5)}
    study = searcher._ot_study
    assert study.best_trial.user_attrs["fluxtune.trial_id"] == "done"
    assert study.best_trial.user_attrs["fluxtune.planned_steps"] == study.best_trial.params["stages.full.steps"]

    (tmp_path / "ray").mkdir()
    ray_own = _searcher(OptunaSearch, tmp_path / "ray")  # why the override: Ray tells such a trial COMPLETE
    ray_own.suggest("stopped")
    ray_own.on_trial_complete("stopped", {"val_loss": 0.05, "global_step": 0})
    assert _states(tmp_path / "ray") == ["COMPLETE"]


def test_the_best_trials_come_from_the_study_across_runs_joined_to_the_sweep_file(tmp_path):
    from fluxtune.search.guard import FiniteOptunaSearch
    from fluxtune.search.ranking import TrialRanking

    first = _searcher(FiniteOptunaSearch, tmp_path)
    _run(first, "stopped", 0.05, early=True)
    _run(first, "z-tied", 0.3)
    first.suggest("diverged")
    first.on_trial_complete("diverged", {"val_loss": math.nan})
    more = _searcher(FiniteOptunaSearch, tmp_path)  # `--more`: a new Tune run on the same study
    _run(more, "a-tied", 0.3)
    _run(more, "best", 0.2)
    states = _trial_states(tmp_path)
    assert {t: s for t, (s, _) in states.items()} == {"stopped": "PRUNED", "z-tied": "COMPLETE", "diverged": "FAIL",
                                                      "a-tied": "COMPLETE", "best": "COMPLETE"}
    rows = [row("stopped", 0.05, steps=1, planned=2), row("z-tied", 0.3), row("diverged", math.nan, error="nan"),
            row("a-tied", 0.3), row("best", 0.2)]
    ranking = TrialRanking("val_loss", "min", f"sqlite:///{tmp_path / 'optuna.db'}", "s")
    assert [r["trial"] for r in ranking.best(rows)] == ["best", "z-tied", "a-tied"]  # ties: the earlier trial
    assert [r["trial"] for r in ranked(rows, "val_loss", "min")] == ["best", "a-tied", "z-tied"]  # rows alone differ
    # The sweep file must agree: a trial it knows to have failed, or does not know, is never published.
    rows[-1] = row("best", 0.2, error="the store filled up")
    assert [r["trial"] for r in ranking.best(rows)] == ["z-tied", "a-tied"]
    assert [r["trial"] for r in ranking.best(rows[:2])] == ["z-tied"]


def test_a_study_that_cannot_be_read_publishes_nothing_and_says_which(tmp_path):
    from fluxtune.config.load import load_search_text
    from fluxtune.search.publish import publish_sweep
    from fluxtune.search.ranking import TrialRanking
    from fluxtune.search.space import StudyUnreadable

    broken = tmp_path / "optuna.db"
    broken.write_text("not a database, a file that took its place")
    with pytest.raises(StudyUnreadable, match=rf"^the Optuna study 's' in sqlite:///{broken} cannot be read: "):
        TrialRanking("val_loss", "min", f"sqlite:///{broken}", "s").best([row("a", 0.1)])

    spec, _ = load_search_text("""\
name: s
base:
  stages: [{name: full, type: full, steps: 2}]
search:
  space: {stages.full.steps: {type: int, low: 1, high: 3}}
""")
    sweep_file = SweepFile.new(tmp_path, "s", "fp")
    sweep_file.optuna_storage = f"sqlite:///{tmp_path / 'other.db'}"  # a database without this sweep's study
    with pytest.raises(StudyUnreadable, match=r"cannot be read: KeyError"):
        publish_sweep([row("a", 0.1)], spec, sweep_file, None, str(tmp_path), lambda config: {}, print)
    assert not (Path(sweep_file.folder) / "best.yaml").exists()


def test_a_corrupt_or_foreign_sweep_file_is_skipped_with_a_warning(tmp_path, caplog):
    good = SweepFile.new(tmp_path, "demo", "fp")
    good.tune_runs = ["tune"]
    good.save()
    other = SweepFile.new(tmp_path, "demo", "fp")
    assert other.sweep_id != good.sweep_id  # same name, same second: a random suffix tells them apart
    for name, text in (("cut", '{"name": "demo", "sweep_'), ("foreign", '{"name": "demo", "owner": "x"}'),
                       ("list", "[1, 2]"), ("typed", json.dumps({**json.loads(good.path.read_text()),
                                                                 "status": 3}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="fluxtune.sweep"):
        found = SweepFile.to_continue(tmp_path, "demo", finished=False, fp="fp", spec_file="s.yaml")
    assert found.sweep_id == good.sweep_id
    skipped = sorted(r.getMessage().split(":")[0] for r in caplog.records)
    assert skipped == [f"skipping {tmp_path / n / 'sweep.json'}" for n in ("cut", "foreign", "list", "typed")]
    assert not list(tmp_path.rglob("*.part"))  # sweep files are renamed into place


def test_a_running_sweep_and_its_store_are_locked(tmp_path):
    from fluxtune.search.locks import Locks, lock_stores, lock_sweep

    first, second = Locks(), Locks()
    lock_sweep(first, tmp_path / "sweep-1", "sweep-1", "s.yaml")
    lock_stores(first, [f"sqlite:///{tmp_path / 'mlflow.db'}", "http://server:5000"], "sweep-1", "s.yaml")
    with pytest.raises(InputError) as refused:
        lock_sweep(second, tmp_path / "sweep-1", "sweep-1", "s.yaml")
    [problem] = refused.value.problems
    assert problem.message.startswith(f"sweep sweep-1 is already running in pid {__import__('os').getpid()} (lock ")
    with pytest.raises(InputError) as busy:
        lock_stores(second, [f"sqlite:///{tmp_path / 'mlflow.db'}"], "sweep-2", "s.yaml")
    assert f"the store {tmp_path / 'mlflow.db'} is in use by sweep sweep-1, pid" in busy.value.problems[0].message
    lock_stores(second, ["http://server:5000", f"sqlite:///{tmp_path / 'other.db'}"], "sweep-2", "s.yaml")
    first.release()
    lock_sweep(second, tmp_path / "sweep-1", "sweep-1", "s.yaml")  # free once its holder let go
    second.release()


@pytest.fixture(scope="module")
def transformer():
    from fluxtune.testing import tiny_model

    return tiny_model().transformer


def test_retention_keeps_what_resume_and_registration_need_and_prunes_the_rest(transformer, tmp_path):
    from types import SimpleNamespace

    from fluxtune.checkpoints import Progress, write_stage_checkpoint
    from fluxtune.search.guard import SweepGuard
    from fluxtune.search.ranking import TrialRanking
    from fluxtune.search.retention import CheckpointKeeper
    from fluxtune.testing import tiny_experiment
    from fluxtune.train.trial import TrialSettings

    experiment = tiny_experiment("""
        data: {jsonl: sample, resolution: 32}
        stages:
          - {name: full, type: full, steps: 2}
          - {name: lora, type: lora, steps: 2}
        """)
    settings = TrialSettings(sweep_id="s", base=experiment, jsonl="rows.jsonl", storage_path=str(tmp_path), plugins={})
    sweep_file = SweepFile.new(tmp_path, "s", "fp")
    exports = tmp_path / "exports"
    (exports / "adapter").mkdir(parents=True)
    (exports / "adapter" / "a.safetensors").write_bytes(b"adapter")

    def keeper(keep: str) -> CheckpointKeeper:
        return CheckpointKeeper(settings, sweep_file, TrialRanking("val_loss", "min"), keep, 1, SweepGuard("val_loss"),
                                lambda config: experiment, print)

    def stage_end(keeper, trial, index: int, stage: str, value: float) -> Path:
        folder = tmp_path / "train" / f"s-{trial.trial_id}" / f"checkpoint_{index:06d}"
        write_stage_checkpoint(folder, transformer, Progress(0, index + 1, 2 * (index + 1)), stage,
                               exports if stage == "lora" else None, {"val_loss": value})
        trial.last_result = {"val_loss": value, "global_step": 2 * (index + 1)}
        keeper.on_trial_result(0, [], trial, {"stage_end": True, "checkpoint_path": str(folder), "cycle": 0,
                                              "stage": stage, **trial.last_result})
        return folder

    def has_weights(folder: Path) -> bool:
        return (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()

    kept = keeper("needed")
    a, b = SimpleNamespace(trial_id="a", config={}), SimpleNamespace(trial_id="b", config={})
    a0 = stage_end(kept, a, 0, "full", 1.0)
    a1 = stage_end(kept, a, 1, "lora", 0.5)
    assert has_weights(a0) and has_weights(a1)  # running: the latest, and the base of its adapter
    kept.on_trial_complete(0, [], a)
    assert has_weights(a0) and not has_weights(a1)  # the best so far: its version needs a0's weights only
    assert (a1 / "exports" / "adapter" / "a.safetensors").exists()  # the adapter is never pruned
    b0 = stage_end(kept, b, 0, "full", 1.0)
    b1 = stage_end(kept, b, 1, "lora", 0.4)
    kept.on_trial_complete(0, [], b)
    assert [has_weights(f) for f in (a0, a1, b0, b1)] == [False, False, True, False]  # b is best now
    assert kept.finish(finished=True) == 0  # nothing else to prune

    everything = keeper("all")
    c = SimpleNamespace(trial_id="c", config={})
    c0, c1 = stage_end(everything, c, 0, "full", 1.0), stage_end(everything, c, 1, "lora", 0.9)
    everything.on_trial_complete(0, [], c)
    assert has_weights(c0) and has_weights(c1) and everything.finish(finished=True) == 0


def test_reports_that_arrive_after_later_stages_were_written_never_prune_the_base_of_the_latest(transformer,
                                                                                                 tmp_path):
    """A busy driver handles a trial's stage-end reports after its workers wrote later stages: the first report
    finds three checkpoints on disk. Found in the reference sweep on a loaded machine: the base of the final
    adapter lost its weights, and the best trial could not be registered."""
    from types import SimpleNamespace

    from fluxtune.checkpoints import Progress, write_stage_checkpoint
    from fluxtune.search.guard import SweepGuard
    from fluxtune.search.ranking import TrialRanking
    from fluxtune.search.retention import CheckpointKeeper
    from fluxtune.testing import tiny_experiment
    from fluxtune.train.trial import TrialSettings

    experiment = tiny_experiment("""
        data: {jsonl: sample, resolution: 32}
        stages:
          - {name: full, type: full, steps: 2}
          - {name: lora, type: lora, steps: 2}
          - {name: refine, type: full, steps: 2}
          - {name: last, type: lora, steps: 2}
        """)
    settings = TrialSettings(sweep_id="s", base=experiment, jsonl="rows.jsonl", storage_path=str(tmp_path), plugins={})
    keeper = CheckpointKeeper(settings, SweepFile.new(tmp_path, "s", "fp"), TrialRanking("val_loss", "min"), "needed",
                              1, SweepGuard("val_loss"), lambda config: experiment, print)
    exports = tmp_path / "exports"
    (exports / "adapter").mkdir(parents=True)
    (exports / "adapter" / "a.safetensors").write_bytes(b"adapter")
    trial = SimpleNamespace(trial_id="a", config={})
    stages = ["full", "lora", "refine", "last"]
    folders = [tmp_path / "train" / "s-a" / f"checkpoint_{i:06d}" for i in range(4)]

    def write(i: int) -> None:
        adapter = exports if stages[i] in ("lora", "last") else None
        write_stage_checkpoint(folders[i], transformer, Progress(0, i + 1, 2 * (i + 1)), stages[i], adapter,
                               {"val_loss": 1.0})

    def report(i: int) -> None:
        trial.last_result = {"val_loss": 1.0, "global_step": 2 * (i + 1)}
        keeper.on_trial_result(0, [], trial, {"stage_end": True, "checkpoint_path": str(folders[i]), "cycle": 0,
                                              "stage": stages[i], **trial.last_result})

    def has_weights(folder: Path) -> bool:
        return (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()

    for i in range(3):  # the workers ran ahead: three stages on disk before the driver sees the first report
        write(i)
    for i in range(3):
        report(i)
    assert [has_weights(f) for f in folders[:3]] == [False, False, True]  # the latest (a full stage) resumes
    write(3)
    report(3)
    assert has_weights(folders[2]) and has_weights(folders[3])  # the final adapter, and the base it trained on
    keeper.on_trial_complete(0, [], trial)
    assert has_weights(folders[2])  # what registration loads


def test_a_trial_finished_by_resume_after_an_error_reaches_optuna(tmp_path):
    """Ray's ConcurrencyLimiter drops the completion of a trial it saw error (the reason for ResumableLimiter)."""
    from ray.tune.search import ConcurrencyLimiter

    from fluxtune.search.guard import FiniteOptunaSearch, ResumableLimiter

    for limiter, expected in ((ConcurrencyLimiter, "RUNNING"), (ResumableLimiter, "COMPLETE")):
        folder = tmp_path / limiter.__name__
        folder.mkdir()
        searcher = limiter(_searcher(FiniteOptunaSearch, folder), max_concurrent=1)
        searcher.set_search_properties("val_loss", "min", {})
        [trial] = _study_trials(searcher, 1)
        searcher.on_trial_complete(trial, {"val_loss": 0.3}, error=True)  # the store filled up
        searcher.on_trial_complete(trial, {"val_loss": 0.2, "global_step": 3})  # --resume finished it
        assert _states(folder) == [expected]


def test_before_a_resume_copies_and_ray_train_lists_a_full_store_cut_short_are_removed(transformer, tmp_path):
    from fluxtune.checkpoints import Progress, write_stage_checkpoint
    from fluxtune.search.retention import repair_cut_short

    run = tmp_path / "train" / "s-t1"
    whole = write_stage_checkpoint(run / "checkpoint_000000", transformer, Progress(0, 1, 2), "full", None, {})
    cut = run / "checkpoint_000001"  # Ray's copy into storage, cut short: no marker
    (cut / "transformer").mkdir(parents=True)
    (cut / "transformer" / "config.json").write_text("{")
    (run / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": [')
    (tmp_path / "train" / "s-t2").mkdir()
    (tmp_path / "train" / "s-t2" / "checkpoint_manager_snapshot.json").write_text("{}")
    warnings: list[str] = []
    repair_cut_short(str(tmp_path), warnings.append)
    assert whole.exists() and not cut.exists()
    assert not (run / "checkpoint_manager_snapshot.json").exists()
    assert (tmp_path / "train" / "s-t2" / "checkpoint_manager_snapshot.json").exists()  # readable: kept
    assert warnings == [f"Ray Train's list of checkpoints {run / 'checkpoint_manager_snapshot.json'} was cut short "
                        "(the store ran out of space): that trial starts again from its first stage"]


def test_a_restarted_attempts_marks_are_run_metrics_even_on_a_stage_end_report():
    from fluxtune.tracking.views import curve_points
    from fluxtune.train.protocol import TrialReport

    stage_end = {"stage_end": True, "global_step": 12, "val_loss": 0.4, "resumed_from_step": 8, "worker_failures": 1,
                 "polish/cycle0/val_loss": 0.4, "samples_per_s": 3.0}
    assert curve_points(TrialReport.from_result(stage_end)) == {"val_loss": 0.4, "resumed_from_step": 8, "worker_failures": 1}


def test_a_failed_save_of_tunes_state_stops_the_sweep_unless_tune_only_raced_with_its_own_temporary_file(tmp_path):
    """Tune copies its local state folder in the background while it writes the next searcher state into it (a
    temporary file renamed into place); seen under load: the copy lists that file and then cannot open it."""
    from fluxtune.search.guard import TUNE_STATE_LOGGER, SweepGuard, tune_state_faults

    staged = f"{tmp_path}/session_1/artifacts/2026-12-01_04-14-57/more-1/driver_artifacts"
    raced = OSError(f"[Errno 2] Failed to open local file '{staged}/.d34231ea-75b2-4457-a8d7-d982703c9b30-tmp-"
                    "searcher-state-2026-12-01_04-15-55.pkl'. Detail: [errno 2] No such file or directory")
    state_gone = OSError(f"[Errno 2] Failed to open local file '{staged}/experiment_state-2026.json'. "
                         "Detail: [errno 2] No such file or directory")
    full = OSError(f"[Errno 28] Failed to open local file '{tmp_path}/runs/x/.d34231ea-75b2-4457-a8d7-d982703c9b30-"
                   "tmp-searcher-state.pkl'. Detail: [errno 28] No space left on device")
    logger = logging.getLogger(TUNE_STATE_LOGGER)
    faults = {}
    for name, cause in {"raced": raced, "state gone": state_gone, "full": full}.items():
        guard = SweepGuard("val_loss")
        with tune_state_faults(guard, str(tmp_path / "runs")):
            try:
                raise cause
            except OSError:
                logger.error("Saving experiment state to storage at 'x' failed with exception: ", exc_info=True)
        faults[name] = guard.fault
    assert faults["raced"] is None  # Tune's next save copies the whole folder again
    assert faults["state gone"].startswith("cannot save the sweep's Tune state under ")
    assert "No space left on device" in faults["full"]
