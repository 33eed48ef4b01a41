"""The Tune trainable: one Ray Train worker group runs every stage of every cycle of a trial."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from fluxtune.config.load import sample_experiment
from fluxtune.plugins import plugin_set, use_plugin_set
from fluxtune.registry import registry
from fluxtune.train.datasets import build_datasets
from fluxtune.train.worker import train_loop_per_worker


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares, fixed by the driver."""

    sweep_id: str
    base: dict[str, Any]  # the normalised base experiment
    jsonl: str  # resolved data path (the generated sample set, or the user's file)
    storage_path: str
    plugins: dict[str, str]
    max_failures: int = 0


def trainer_for(experiment: dict[str, Any], settings: TrialSettings, run_name: str) -> TorchTrainer:
    use_gpu = experiment["gpus_per_worker"] > 0
    resources = {"CPU": experiment["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = experiment["gpus_per_worker"]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": experiment, "plugins": settings.plugins},
        scaling_config=ScalingConfig(num_workers=experiment["workers"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        datasets=build_datasets(settings.jsonl, experiment["data"], experiment["seed"]),
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            # Deterministic per trial: a restarted trial finds its own stage checkpoints, and only its own.
            name=run_name, storage_path=os.path.join(settings.storage_path, "train"),
            callbacks=[TuneReportCallback()] if _in_tune() else [],
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )


def _in_tune() -> bool:
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    return _in_tune_session()


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune function trainable; `config` holds the sampled values by dotted path."""
    use_plugin_set(settings.plugins)
    experiment = sample_experiment(settings.base, config, registry())
    trial_id = tune.get_context().get_trial_id()
    trainer_for(experiment, settings, f"{settings.sweep_id}-{trial_id}").fit()


def trainable(settings: TrialSettings):
    return tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": 0.01})


__all__ = ["TrialSettings", "plugin_set", "run_trial", "trainable", "trainer_for"]
