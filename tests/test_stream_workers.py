"""Two Ray Train workers of one run stream disjoint shares of the training rows, straight from the cache (on the
shared two-worker run of tests/two_workers.py)."""

from __future__ import annotations

from generated_cache import write_generated_cache

ROWS = 96
EXPERIMENT = {"seed": 3, "model": {"preset": "tiny-fill", "seed": 0},
              "data": {"resolution": 32, "val_fraction": 0.25, "cache_dtype": "float32", "val_max_rows": 8}}


def two_worker_check(folder, sample_jsonl):
    """For tests/two_workers.py: a generated cache, and the data set-up each worker of a trial runs on it."""
    return first_epoch_lines, {"experiment": EXPERIMENT, "data_source": write_generated_cache(str(folder / "cache"),
                                                                                              ROWS)}


def first_epoch_lines(config: dict, rank: int, world: int) -> dict:
    """Each worker: the real data set-up of a trial, then the line numbers of its first epoch's batches."""
    from fluxtune.data.stream_plan import Load
    from fluxtune.train.worker import _load_data

    train, val = _load_data(config["experiment"], config, rank, world)
    plan = train.plan(4, 17)
    loads, count = len(plan.epoch(0)), 0
    for event in plan.events():  # batches before the next epoch's first read
        loads -= isinstance(event, Load)
        if loads < 0:
            break
        count += not isinstance(event, Load)
    batches = train.batches(4, 17)
    return {"lines": [int(v) for _ in range(count) for v in next(batches)["x0"][:, 0, 0].tolist()], "val": len(val)}


def test_two_workers_of_one_run_read_disjoint_shards_covering_the_training_rows(two_train_workers):
    from fluxtune.data.images import split_is_validation
    from two_workers import records_of

    shares = records_of(two_train_workers, "test_stream_workers")
    training = {line for line in range(1, ROWS + 1)
                if not split_is_validation(f"images/{line:05d}_target.png", 0.25, 3)}
    first, second = (share["lines"] for share in shares)
    assert first and second and not set(first) & set(second)
    assert len(first) + len(second) == len(training) and set(first) | set(second) == training
    assert [share["val"] for share in shares] == [8, 8]  # every worker holds the same bounded validation set
