"""What a worker's training stream reads and batches, decided on row ids alone (no tensor is touched here).

For a stage's stream seed, a rank and a world size, epoch after epoch:

1. the units (Parquet row groups) holding training rows are permuted with a seed that is the same on every
   rank; with at least as many units as ranks, rank r takes every world-th unit from position r (round robin),
   else every rank walks all units and keeps every world-th training row (so 16 rows and 2 workers work);
2. each unit's rows enter a shuffle buffer; while it holds more than `shuffle_buffer` rows (counting the rows
   waiting in per-bucket batches), a seeded random row leaves it for its bucket's pending batch, and a pending
   batch that reaches `batch_size` rows is emitted: a batch never mixes image sizes;
3. at the end of an epoch the buffer empties the same way and each bucket's remainder is emitted as a smaller
   batch, so every epoch covers this rank's rows exactly once.

The same (stream seed, rank, world) gives the same events; `events(skip=n)` jumps to batch n by replaying the
plan on ids and then loading only the rows still waiting at that point.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Iterator

import numpy as np

from fluxtune.data.cache_index import CacheIndex


@dataclass(frozen=True)
class Load:
    """Read unit `unit` and keep these rows of it (row ids)."""

    unit: int
    rows: np.ndarray


@dataclass(frozen=True)
class Batch:
    """Emit these rows (row ids, one bucket) as the next batch."""

    rows: np.ndarray


class StreamPlan:
    def __init__(self, index: CacheIndex, seed: int, rank: int, world_size: int, batch_size: int,
                 shuffle_buffer: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.index, self.seed, self.rank, self.world = index, seed, rank, world_size
        self.batch_size, self.capacity = batch_size, shuffle_buffer
        train = index.training_rows()
        by_unit = train[np.argsort(index.row_unit[train], kind="stable")]
        self.units, starts = np.unique(index.row_unit[by_unit], return_index=True)
        self.unit_rows = np.split(by_unit, starts[1:]) if len(by_unit) else []
        mine = sum(len(rows) for _, rows in self.epoch(0))
        if not mine:
            raise ValueError(f"worker {rank} of {world_size} gets no training rows: the cache has {len(train)} "
                             "training rows; use fewer workers or more data")

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This rank's (unit, training row ids) in reading order for `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))  # same on every rank
        if len(self.units) >= self.world:
            return [(int(self.units[u]), self.unit_rows[u]) for u in order[self.rank::self.world]]
        mine, position = [], 0
        for u in order:
            rows = self.unit_rows[u]
            kept = rows[(position + np.arange(len(rows))) % self.world == self.rank]
            position += len(rows)
            if len(kept):
                mine.append((int(self.units[u]), kept))
        return mine

    def events(self, skip: int = 0) -> Iterator[Load | Batch]:
        """Endless Loads and Batches; with `skip`, from batch `skip` on (first loading the rows still waiting)."""
        events = self._events()
        if skip > 0:
            waiting: set[int] = set()
            emitted = 0
            for event in events:
                if isinstance(event, Load):
                    waiting.update(event.rows.tolist())
                    continue
                waiting.difference_update(event.rows.tolist())
                emitted += 1
                if emitted == skip:
                    break
            rows = np.array(sorted(waiting), dtype=np.int64)
            units = self.index.row_unit[rows]
            for unit in np.unique(units):
                yield Load(int(unit), rows[units == unit])
        yield from events

    def _events(self) -> Iterator[Load | Batch]:
        draw = np.random.default_rng([self.seed, self.rank, self.world, 1])
        bucket = self.index.bucket
        buffer: list[int] = []
        pending: list[list[int]] = [[] for _ in self.index.sizes]
        waiting = 0  # rows in pending batches

        def take_one() -> Iterator[Batch]:
            nonlocal waiting
            i = int(draw.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            row = buffer.pop()
            batch = pending[bucket[row]]
            batch.append(row)
            waiting += 1
            if len(batch) == self.batch_size:
                waiting -= len(batch)
                pending[bucket[row]] = []
                yield Batch(np.array(batch, dtype=np.int64))

        for epoch in count():
            for unit, rows in self.epoch(epoch):
                yield Load(unit, rows)
                buffer.extend(rows.tolist())
                while buffer and len(buffer) + waiting > self.capacity:
                    yield from take_one()
            while buffer:
                yield from take_one()
            for b, batch in enumerate(pending):
                if batch:
                    yield Batch(np.array(batch, dtype=np.int64))
                    pending[b] = []
            waiting = 0
