"""Starting (or joining) Ray with settings that keep small machines from hanging or waiting."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from fluxtune.train.local_ray import LocalRay, start_local_ray

# Faster Train start-up and no metrics agent traffic (measured: the fixed cost of a fit ≈11 s → ≈7.5 s).
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # A trial stopped by ASHA/median is blocked in TorchTrainer.fit() and never sees Tune's stop: without this
    # Tune waits 600 s before killing it, and its Train workers hold their CPUs (the next trial cannot start).
    "TUNE_FORCE_TRIAL_CLEANUP_S": "10",
    # Tune saves the sweep's state at most every 10 s by default: a driver killed within 10 s of a trial's start
    # would leave that trial out of `--resume` (and its Optuna trial RUNNING for good).
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
}


def local_cpus(workers: int, cpus_per_worker: float, concurrent_trials: int) -> int:
    """Logical CPUs for a local Ray: every trial's workers plus one CPU left free for Ray Data's read tasks.

    Without the spare CPU the Train workers reserve everything and the data read never runs (the trial then hangs).
    """
    needed = concurrent_trials * (workers * cpus_per_worker + 0.01) + 1
    return max(os.cpu_count() or 1, math.ceil(needed))


_local: LocalRay | None = None  # the cluster this process started, if any


def start_ray(address: str | None, num_cpus: int, verbose: bool = False) -> LocalRay | None:
    """Join `address`, or start a local cluster that ends with this process (returned; None when joined).

    A joined cluster is never stopped by fluxtune; a local one is stopped at exit, and by its keeper
    (fluxtune.train.local_ray) if this process is killed.
    """
    global _local
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # before Ray starts, so every Ray process inherits them
    import ray

    if ray.is_initialized():
        return _local
    if _local is not None:  # ray.shutdown() was called (tests do between modules): end that cluster too
        _local.stop()
        _local = None
    quiet_ray(verbose)  # importing ray configured its loggers
    kwargs = dict(include_dashboard=False, log_to_driver=verbose, logging_level=logging.WARNING if verbose else
                  logging.ERROR, configure_logging=True)
    address = address or os.environ.get("RAY_ADDRESS")  # as `ray` itself does: join the cluster it names
    if address:
        ray.init(address=address, **kwargs)
    else:
        _local = start_local_ray(num_cpus, verbose)
        ray.init(address=_local.address, _node_ip_address="127.0.0.1", **kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    quiet_ray(verbose)  # ray.init and ray.data set their loggers up again
    return _local


def quiet_ray(verbose: bool) -> None:
    """Ray's INFO lines and advice (dataset plans, token auth, Tune notes) only with `-v`; errors always. Ray Data's
    log file in the Ray session keeps everything."""
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # its console handler (the file handler keeps INFO)
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def check_resources(experiments: list[dict[str, Any]], spec_file: str) -> None:
    """Refuse, before any trial, a trial that the cluster can never place (it would wait forever).

    `experiments` are the base with the extreme searched resource values; the largest need is reported.
    """
    import ray

    from fluxtune.config.errors import InputError, Problem

    total = ray.cluster_resources()
    problems = []
    for kind, per_worker, key, extra in (("CPU", "cpus_per_worker", "base.cpus_per_worker", 0.01),
                                         ("GPU", "gpus_per_worker", "base.gpus_per_worker", 0.0)):
        # + the trial driver's small CPU fraction (tune.with_resources)
        worst = max(experiments, key=lambda e: e["workers"] * e[per_worker])
        need = worst["workers"] * worst[per_worker] + extra
        if need > total.get(kind, 0.0):
            problems.append(Problem(spec_file, f"a trial needs {need:g} {kind}s ({worst['workers']} workers × "
                                    f"{worst[per_worker]:g}); the Ray cluster has {total.get(kind, 0.0):g}",
                                    key=key))
    if problems:
        raise InputError(problems)
