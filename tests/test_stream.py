"""Training rows streamed from the latent cache: reproducible, sharded, bounded, bucketed, resumable mid-stage.

The caches here are written directly (tests/generated_cache.py): every row's x0 holds its line number, so each
assertion reads back exactly which rows a batch holds. No Ray, no model."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from fluxtune.data.cache_index import CacheIndex
from fluxtune.data.images import split_is_validation
from fluxtune.data.prompt_table import PromptTable
from fluxtune.data.stream import TrainingStream
from fluxtune.data.stream_plan import Load
from generated_cache import POOLED, TEXT_LENGTH, TEXT_WIDTH, lines_of, prompt_value, write_generated_cache

SIZES = ((48, 48), (32, 64), (64, 32))  # (height, width): 9, 8 and 8 image tokens
ROWS, VAL_FRACTION = 300, 0.1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_generated_cache(str(tmp_path_factory.mktemp("generated")), ROWS, sizes=SIZES, resolution=48)


def _stream(cache, rank=0, world=1, shuffle_buffer=32, prompt_cache=8, seed=0, **kwargs) -> TrainingStream:
    index = CacheIndex.read(f"{cache}/rows", VAL_FRACTION, seed, explicit_val=False)
    return TrainingStream(index, PromptTable(f"{cache}/prompts", prompt_cache), vae_scale_factor=8, rank=rank,
                          world_size=world, shuffle_buffer=shuffle_buffer, **kwargs)


def _training_lines(seed=0) -> set[int]:
    return {line for line in range(1, ROWS + 1)
            if not split_is_validation(f"images/{line:05d}_target.png", VAL_FRACTION, seed)}


def _epoch_batches(stream: TrainingStream, batch_size: int, seed: int) -> int:
    """How many batches this rank's first epoch has (read off the plan: batches before epoch 1's first Load)."""
    plan = stream.plan(batch_size, seed)
    loads = len(plan.epoch(0))
    batches = 0
    for event in plan.events():
        if isinstance(event, Load):
            loads -= 1
            if loads < 0:
                return batches
        else:
            batches += 1
    raise AssertionError("unreachable: the plan is endless")


def test_the_index_numbers_rows_by_line_and_splits_them_like_preflight(cache):
    index = CacheIndex.read(f"{cache}/rows", VAL_FRACTION, 0, explicit_val=False)
    assert index.line.tolist() == list(range(1, ROWS + 1))  # written shuffled over two files
    assert set(index.line[index.training_rows()].tolist()) == _training_lines()
    assert np.bincount(index.row_unit).max() <= 16 and index.units >= ROWS // 16
    first_rows = [np.flatnonzero(index.row_unit == u)[0] for u in range(index.units)]
    assert first_rows == sorted(first_rows)  # units numbered by their first row: the same everywhere


def test_trials_read_the_index_file_the_build_wrote_and_it_matches_a_scan_of_the_rows(cache):
    from pathlib import Path

    assert Path(cache, "index.parquet").is_file()
    from_file = CacheIndex.read(f"{cache}/rows", VAL_FRACTION, 0, False, index_path=f"{cache}/index.parquet")
    scanned = CacheIndex.read(f"{cache}/rows", VAL_FRACTION, 0, False)
    for name in ("unit_file", "unit_group", "row_unit", "row_offset", "line", "is_val", "prompt_index", "bucket"):
        assert np.array_equal(getattr(from_file, name), getattr(scanned, name)), name
    assert from_file.files == scanned.files and from_file.sizes == scanned.sizes


def test_the_same_seed_rank_and_world_give_the_same_batches_and_another_seed_others(cache):
    def lines(seed):
        return [lines_of(batch) for batch in islice(_stream(cache).batches(4, seed), 60)]

    first = lines(seed=7)
    assert first == lines(seed=7)
    assert first != lines(seed=8)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shares_that_together_cover_each_epoch(cache, world):
    for seed in (0, 1):
        shares = []
        for rank in range(world):
            stream = _stream(cache, rank, world)
            count = _epoch_batches(stream, 4, seed)
            shares.append([line for batch in islice(stream.batches(4, seed), count) for line in lines_of(batch)])
        assert sum(len(share) for share in shares) == len(_training_lines())  # each row once: disjoint...
        assert set().union(*shares) == _training_lines()  # ... and covering the epoch


def test_sixteen_rows_in_one_unit_are_shared_row_by_row_between_two_workers(tmp_path):
    small = write_generated_cache(str(tmp_path / "small"), 16, files=1)
    index = CacheIndex.read(f"{small}/rows", 0.0, 0, explicit_val=False)
    assert index.units == 1
    shares = []
    for rank in range(2):
        stream = TrainingStream(index, PromptTable(f"{small}/prompts", 4), 8, rank=rank, world_size=2)
        shares.append({line for batch in islice(stream.batches(4, 5), 2) for line in lines_of(batch)})
    assert len(shares[0]) == len(shares[1]) == 8 and shares[0] | shares[1] == set(range(1, 17))
    with pytest.raises(ValueError, match="worker 16 of 17 gets no training rows: the cache has 16"):
        TrainingStream(index, PromptTable(f"{small}/prompts", 4), 8, rank=16, world_size=17).plan(4, 0)


def test_rows_held_stay_within_the_shuffle_buffer_one_unit_and_the_prefetched_units(cache):
    stream = _stream(cache, shuffle_buffer=24, prefetch=2)
    assert sum(1 for _ in islice(stream.batches(4, 3), 150)) == 150  # two epochs and more
    bound = 24 + 16 + 2 * 16  # buffer (with pending batches) + the unit being added + 2 units read ahead
    assert 24 < stream.stats.peak_rows_held <= bound < ROWS


def test_every_batch_comes_from_one_bucket_and_carries_its_token_grid(cache):
    index = CacheIndex.read(f"{cache}/rows", VAL_FRACTION, 0, explicit_val=False)
    size_of_line = {line: index.sizes[b] for line, b in zip(index.line.tolist(), index.bucket.tolist())}
    seen = set()
    for batch in islice(_stream(cache).batches(4, 0), 80):
        (height, width), = {size_of_line[line] for line in lines_of(batch)}  # one size per batch
        rows, columns = int(batch["height"]), int(batch["width"])
        assert (rows, columns) == (height // 16, width // 16)
        assert batch["x0"].shape[1] == batch["cond"].shape[1] == batch["img_ids"].shape[0] == rows * columns
        assert batch["img_ids"][:, 1].max() == rows - 1 and batch["img_ids"][:, 2].max() == columns - 1
        assert torch.equal(batch["mask"], batch["cond"][..., 64:])
        seen.add((height, width))
    assert seen == set(SIZES)


def test_prompt_embeddings_follow_each_row_with_at_most_capacity_held(cache):
    stream = _stream(cache, prompt_cache=2)
    for batch in islice(stream.batches(4, 0), 30):
        expected = torch.tensor([prompt_value(line % 3) for line in lines_of(batch)])
        assert batch["prompt_embeds"].shape[1:] == (TEXT_LENGTH, TEXT_WIDTH) and batch["pooled"].shape[1] == POOLED
        assert torch.equal(batch["prompt_embeds"][:, 0, 0], expected) and torch.equal(batch["pooled"][:, 0], expected)
        assert stream.prompts.held <= 2
    assert stream.prompts.reads > 1  # three prompts through a table of two: some were read again


def test_skip_resumes_exactly_where_an_uninterrupted_stream_is_without_reading_the_skipped_rows(cache):
    whole = _stream(cache)
    uninterrupted = [lines_of(b) for b in islice(whole.batches(4, 11), 70)]
    resumed_stream = _stream(cache)
    resumed = [lines_of(b) for b in islice(resumed_stream.batches(4, 11, skip=55), 15)]
    assert resumed == uninterrupted[55:]
    assert whole.stats.rows_read >= 70 * 4
    # Only the rows waiting in the buffer at batch 55, the 15 batches' own rows and what was read ahead.
    assert resumed_stream.stats.rows_read <= 32 + 15 * 4 + 3 * 16 < 55 * 4


def test_float16_caches_are_upcast_on_read(tmp_path):
    half = write_generated_cache(str(tmp_path / "half"), 40, dtype="float16")
    index = CacheIndex.read(f"{half}/rows", 0.0, 0, explicit_val=False)
    batch = next(TrainingStream(index, PromptTable(f"{half}/prompts", 4), 8).batches(4, 0))
    assert batch["x0"].dtype == batch["prompt_embeds"].dtype == torch.float32
    lines = lines_of(batch)  # lines below 2048 are exact in float16
    assert set(lines) <= set(range(1, 41)) and torch.equal(batch["cond"][:, 0, 0], -torch.tensor(lines).float())


def _experiment(**data):
    return {"seed": 0, "model": {"preset": "tiny-fill", "seed": 0},
            "data": {"resolution": 48, "val_fraction": VAL_FRACTION, "buckets": [[48, 48], [64, 32], [32, 64]],
                     "cache_dtype": "float32", **data}}


def _val_lines(val) -> list[int]:
    parts = getattr(val, "parts", [val])
    return sorted(int(v) for part in parts for v in part.x0[:, 0, 0].tolist())


def test_validation_is_the_first_rows_of_the_split_read_once_and_bounded(cache):
    from fluxtune.train.datasets import trial_data

    first_val = sorted(set(range(1, ROWS + 1)) - _training_lines())
    _, val = trial_data(cache, _experiment(val_max_rows=5))
    assert len(val) == 5 and _val_lines(val) == first_val[:5]
    _, everything = trial_data(cache, _experiment(val_max_rows=1000))
    assert _val_lines(everything) == first_val  # the bound is a maximum


def test_a_validation_file_makes_exactly_its_rows_the_validation_set(tmp_path):
    from fluxtune.train.datasets import trial_data

    folder = write_generated_cache(str(tmp_path / "explicit"), 40, resolution=32, val_file_rows=6)
    experiment = {**_experiment(), "data": {"resolution": 32, "val_fraction": 0.5, "cache_dtype": "float32"}}
    train, val = trial_data(folder, experiment)
    assert _val_lines(val) == list(range(35, 41))
    assert {line for batch in islice(train.batches(8, 0), 5) for line in lines_of(batch)} == set(range(1, 35))


def test_the_in_memory_reader_holds_exactly_this_ranks_training_rows(cache):
    from fluxtune.train.datasets import trial_data

    shares = [trial_data(cache, _experiment(), rank, 2, reader="memory")[0] for rank in range(2)]
    lines = [_val_lines(share) for share in shares]
    assert not set(lines[0]) & set(lines[1]) and set(lines[0]) | set(lines[1]) == _training_lines()


def test_a_trial_refuses_a_cache_built_for_other_data(cache):
    from fluxtune.train.datasets import trial_data

    with pytest.raises(ValueError, match="dtype float32 \\(wanted float16\\)"):
        trial_data(cache, _experiment(cache_dtype="float16"))
    with pytest.raises(ValueError, match="is not a latent cache"):
        trial_data(f"{cache}/rows", _experiment())


def test_a_stage_context_replays_its_stream_resumes_it_with_skip_and_shares_it_out_across_ranks(cache):
    """What stages see through `ctx.batches()`: a restarted stage gets the same batches, `skip` resumes one
    mid-stage, another cycle draws another stream, and the ranks of one stage draw disjoint rows."""
    from pathlib import Path

    from fluxtune.context import RunContext, WorkerSetup

    def context(rank=0, world=1, cycle=0, name="full"):
        setup = WorkerSetup(train=_stream(cache, rank, world), val=None, batch_size=4, guidance=30.0, loss_fn=None,
                            timesteps=None, reporter=None, components=None, device=torch.device("cpu"), rank=rank,
                            world_size=world, seed=3)
        return RunContext(setup=setup, name=name, cycle=cycle, steps=10, transformer=None,
                          export_dir=Path("unused"), first_global_step=0, stream_seed=rank)

    def lines(ctx, count=20, skip=0):
        return [lines_of(batch) for batch in islice(ctx.batches(skip=skip), count)]

    first = lines(context())
    assert lines(context()) == first  # a restarted stage replays its stream from batch 0
    assert lines(context(), count=12, skip=8) == first[8:]
    assert lines(context(cycle=1)) != first and lines(context(name="lora")) != first
    shares = [{line for batch in lines(context(rank, 2), count=10) for line in batch} for rank in range(2)]
    assert not shares[0] & shares[1]  # different stream seeds per rank, one setup unit permutation
