"""Two Ray Train workers of one run stream disjoint shares of the training rows, straight from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generated_cache import write_generated_cache

ROWS = 96


def _record_epoch(config: dict) -> None:
    """Each worker: the real data set-up of a trial, then the line numbers of its first epoch's batches."""
    import ray.train

    from fluxtune.data.stream_plan import Load
    from fluxtune.train.worker import _load_data

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train, val = _load_data(config["experiment"], config, rank, world)
    plan = train.plan(4, 17)
    loads, count = len(plan.epoch(0)), 0
    for event in plan.events():  # batches before the next epoch's first read
        loads -= isinstance(event, Load)
        if loads < 0:
            break
        count += not isinstance(event, Load)
    batches = train.batches(4, 17)
    lines = [int(v) for _ in range(count) for v in next(batches)["x0"][:, 0, 0].tolist()]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"lines": lines, "val": len(val)}))


@pytest.mark.timeout(300)
def test_two_workers_of_one_run_read_disjoint_shards_covering_the_training_rows(tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fluxtune.data.images import split_is_validation
    from fluxtune.train.cluster import local_cpus, start_ray

    cache = write_generated_cache(str(tmp_path / "cache"), ROWS)
    experiment = {"seed": 3, "model": {"preset": "tiny-fill", "seed": 0},
                  "data": {"resolution": 32, "val_fraction": 0.25, "cache_dtype": "float32", "val_max_rows": 8}}
    start_ray(None, local_cpus(workers=2, cpus_per_worker=0.5, concurrent_trials=1))
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this test module
    TorchTrainer(_record_epoch, train_loop_config={"experiment": experiment, "data_source": cache, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="two-workers", storage_path=str(tmp_path / "runs"))).fit()

    shares = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    training = {line for line in range(1, ROWS + 1)
                if not split_is_validation(f"images/{line:05d}_target.png", 0.25, 3)}
    first, second = (share["lines"] for share in shares)
    assert first and second and not set(first) & set(second)
    assert len(first) + len(second) == len(training) and set(first) | set(second) == training
    assert [share["val"] for share in shares] == [8, 8]  # every worker holds the same bounded validation set
