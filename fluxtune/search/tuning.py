"""Tune's side of a search spec: the searcher (Optuna, define-by-run, finite metrics only), the scheduler, and
the resource corners the cluster must fit before anything starts."""

from __future__ import annotations

from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

from fluxtune.config.paths import corner_trees
from fluxtune.config.schema import SearchSpec
from fluxtune.search.guard import FiniteOptunaSearch, ResumableLimiter
from fluxtune.search.space import DefineByRun, max_total_steps, optuna_sampler, optuna_storage
from fluxtune.train.protocol import GLOBAL_STEP_KEY

RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker")


def scheduler_for(search: SearchSpec, base: dict[str, Any]):
    kind = search.scheduler
    if kind.type == "fifo":
        return FIFOScheduler()
    if kind.type == "median":
        return MedianStoppingRule(time_attr=GLOBAL_STEP_KEY, metric=search.metric, mode=search.mode,
                                  grace_period=kind.grace_period, min_samples_required=kind.min_samples)
    return ASHAScheduler(time_attr=GLOBAL_STEP_KEY, metric=search.metric, mode=search.mode,
                         grace_period=kind.grace_period, reduction_factor=kind.reduction_factor,
                         max_t=max(max_total_steps(base, search.space), kind.grace_period + 1))


def resource_corners(base: dict[str, Any], search: SearchSpec) -> list[dict[str, Any]]:
    """The base with every combination of the extreme searched resource values (workers, CPUs, GPUs)."""
    return list(corner_trees(base, search.space, [k for k in RESOURCE_KEYS if k in search.space]))


def searcher_for(search: SearchSpec, base: dict[str, Any], storage_url: str, study: str, earlier_trials: int,
                 planned_steps: Callable[[dict[str, Any]], int]):
    """None for an empty space (Tune's own variant generator runs the base). `planned_steps`: a trial's config →
    the global steps it plans (picklable), from which the searcher knows when a trial was stopped early."""
    if not search.space:
        return None
    optuna = FiniteOptunaSearch(space=DefineByRun(search.space, base), metric=search.metric, mode=search.mode,
                                sampler=optuna_sampler(search, seed_offset=earlier_trials), study_name=study,
                                storage=optuna_storage(storage_url), planned_steps=planned_steps)
    return ResumableLimiter(optuna, max_concurrent=search.max_concurrent)
