"""The Tune trainable: one Ray Train worker group runs every stage of every cycle of a trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ray import tune
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback

from fluxtune import storage
from fluxtune.checkpoints import usable_checkpoint
from fluxtune.components import loaded_components
from fluxtune.config.frozen import thaw
from fluxtune.config.resolved import resolve_trial
from fluxtune.config.stage_keys import data_identity, stage_keys
from fluxtune.plugins import plugin_set, use_plugin_set
from fluxtune.train.protocol import LAST_FAILURE_KEY, WORKER_FAILURES_KEY, SweepLayout
from fluxtune.train.ray_private import torch_trainer, wait_for_the_last_report
from fluxtune.train.worker import train_loop_per_worker

if TYPE_CHECKING:  # torch is imported where a trainer is built (the trial's actor), not in the sweep's driver
    from ray.train.torch import TorchTrainer


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares, fixed by the driver."""

    sweep_id: str
    base: dict[str, Any]  # the normalised base experiment
    jsonl: str  # the latent cache (or cache set) prepared from the data file, which trials read
    storage_path: str
    plugins: dict[str, str]
    max_failures: int = 0  # Train restarts of a trial's workers (search.max_failures)
    reuse_stages: bool = False

    @property
    def layout(self) -> SweepLayout:
        """Where the trials' side of the sweep lives (Train runs, the stage cache)."""
        return SweepLayout(self.sweep_id, self.storage_path)

    def keys_of(self, experiment: dict[str, Any]) -> list[dict[str, Any]]:
        return stage_keys(experiment, data_identity(self.jsonl), self.plugins)


def cached_prefix(experiment: dict[str, Any], settings: TrialSettings, trial_id: str | None = None,
                  refused: list[str] | None = None) -> dict[str, Any] | None:
    """The latest stage of this experiment whose identical twin already ran in another trial: its reuse entry,
    or None. A resumed trial's own stages are its checkpoints, not reuse. Only a checkpoint whose weights are
    there (not pruned) and hash as written is offered; the longest such prefix wins (one hash pass each)."""
    candidates = []
    # Never the last stage: a trial must train something to report its own metrics (a repeated configuration
    # reuses everything before its final stage).
    for entry in settings.keys_of(experiment)[:-1]:
        offered = storage.read_json(settings.layout.reusable_stage(entry["key"]))
        if offered is None or offered.get("trial") == trial_id:
            break  # a prefix: the first missing stage (or one this very trial ran) ends it
        candidates.append({**offered, **entry})
    for candidate in reversed(candidates):  # a key names its whole prefix: a shorter one is a fallback
        if usable_checkpoint(candidate["checkpoint"], problems=refused) is not None:
            return candidate
    return None


def offer_stage_for_reuse(settings: TrialSettings, experiment: dict[str, Any], cycle: int, stage: str, checkpoint: str,
                          trial_id: str, global_step: int) -> None:
    """Offer a finished stage checkpoint for reuse (first writer wins; written atomically)."""
    for entry in settings.keys_of(experiment):
        if (entry["cycle"], entry["stage"]) != (cycle, stage):
            continue
        path = settings.layout.reusable_stage(entry["key"])
        if not storage.exists(path):
            storage.write_json(path, {"checkpoint": checkpoint, "trial": trial_id, "global_step": global_step})
        return


def trainer_for(experiment: Mapping[str, Any], settings: TrialSettings, run_name: str,
                initial_checkpoint: str | None = None, trial_id: str | None = None,
                data_reader: str = "stream") -> TorchTrainer:
    """The trial's worker group. Workers read the latent cache `settings.jsonl` themselves (no Ray Data):
    `data_reader="memory"` makes them load their rows whole, only for the benchmark comparing the two."""
    use_gpu = experiment["gpus_per_worker"] > 0
    resources = {"CPU": experiment["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = experiment["gpus_per_worker"]
    return torch_trainer(
        train_loop_per_worker,
        # initial_checkpoint: a reused stage prefix; the worker prefers this run's own checkpoint (a restart).
        # The workers get their own plain copy: stage and plugin code may edit what it is handed.
        train_loop_config={"experiment": thaw(experiment), "plugins": settings.plugins,
                           "initial_checkpoint": initial_checkpoint,
                           "sweep_id": settings.sweep_id, "trial_id": trial_id,
                           "data_source": settings.jsonl, "data_reader": data_reader},
        scaling_config=ScalingConfig(num_workers=experiment["workers"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            # Deterministic per trial: a restarted trial finds its own stage checkpoints, and only its own.
            name=run_name, storage_path=settings.layout.train,
            callbacks=[FailureCountingReport()] if _in_tune() else [],
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )


class FailureCountingReport(TuneReportCallback):
    """Forwards rank 0's reports to Tune, plus how often Train restarted this run's workers.

    Runs in the Train controller, the only place that sees a worker die; a restarted group resumes from the
    last stage checkpoint (`worker._resume`), and the driver shows the count in MLflow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.last_failure = ""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        self.last_failure = "; ".join(f"rank {rank}: {type(error).__name__}: {_first_line(error)}"
                                      for rank, error in sorted(worker_exceptions.items()))

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.failures:
            metrics = [{**metrics[0], WORKER_FAILURES_KEY: self.failures, LAST_FAILURE_KEY: self.last_failure},
                       *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _in_tune() -> bool:
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    return _in_tune_session()


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune function trainable; `config` holds the sampled values by dotted path."""
    use_plugin_set(settings.plugins)
    experiment = resolve_trial(settings.base, config, loaded_components()).experiment
    trial_id = tune.get_context().get_trial_id()
    refused: list[str] = []
    reused = cached_prefix(experiment, settings, trial_id, refused) if settings.reuse_stages else None
    if refused:
        storage.write_json(settings.layout.refused_checkpoints(trial_id), {"refused": refused})
    if reused is not None:
        storage.write_json(settings.layout.reused_prefix(trial_id), reused)
    trainer_for(experiment, settings, settings.layout.run_name(trial_id),
                reused["checkpoint"] if reused else None, trial_id=trial_id).fit()
    wait_for_the_last_report()


def trainable(settings: TrialSettings):
    return tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": 0.01})


__all__ = ["TrialSettings", "cached_prefix", "offer_stage_for_reuse", "plugin_set", "run_trial", "trainable",
           "trainer_for"]
