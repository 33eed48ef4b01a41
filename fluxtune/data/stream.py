"""A worker's training data streamed from the latent cache: batches as tensors on the device, never the whole shard.

`TrainingStream` holds the cache index, a reader of units (Parquet row groups) and the prompt table; each stage
asks it for `batches(batch_size, seed)`, which follows a `StreamPlan` (row ids only) and reads each unit in a
background thread a few units ahead of the training step. Rows held at any time: the shuffle buffer (with the
pending per-bucket batches), the unit being added to it, and `prefetch` units read ahead; prompt embeddings:
at most the prompt table's capacity.

`read_examples` reads a fixed list of rows whole (the bounded validation set; the in-memory comparison path).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from fluxtune.data.cache_format import tensor_rows
from fluxtune.data.cache_index import CacheIndex, open_parquet
from fluxtune.data.prompt_table import PromptTable
from fluxtune.data.stream_plan import Batch, Load, StreamPlan
from fluxtune.flux.packing import latent_image_ids, text_ids

PREFETCH_UNITS = 2  # units read ahead of the training step: enough to hide a read behind one or two steps
OPEN_FILES = 8  # Parquet files a reader keeps open (each holds its footer)

Row = tuple[np.ndarray, np.ndarray, int]  # x0 [seq, 64], cond [seq, 320] in the cache's dtype; prompt index


class UnitReader:
    """Reads rows of one unit (a row group) from a local or remote Parquet file; used by one thread at a time."""

    def __init__(self, index: CacheIndex):
        self.index = index
        self._open: OrderedDict[int, Any] = OrderedDict()

    def read(self, unit: int, rows: np.ndarray) -> dict[int, Row]:
        file, group = int(self.index.unit_file[unit]), int(self.index.unit_group[unit])
        if file not in self._open:
            self._open[file] = open_parquet(self.index.files[file])
            while len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        self._open.move_to_end(file)
        table = self._open[file].read_row_group(group, columns=["prompt_index", "x0", "cond"])
        positions = self.index.row_offset[rows].tolist()  # only the rows asked for are copied out and kept
        prompts = table.column("prompt_index").to_numpy()[positions].tolist()
        return dict(zip(rows.tolist(), zip(tensor_rows(table, "x0", positions), tensor_rows(table, "cond", positions),
                                           prompts)))


@dataclass
class StreamStats:
    """What a stream held and read (tests check the memory bound with it)."""

    peak_rows_held: int = 0  # rows in the buffer, pending batches and units read ahead, at most
    batches: int = 0
    units_read: int = 0
    rows_read: int = 0


@dataclass
class TrainingStream:
    index: CacheIndex
    prompts: PromptTable
    vae_scale_factor: int
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 256
    prefetch: int = PREFETCH_UNITS
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: StreamStats = field(default_factory=StreamStats)
    _position_ids: dict[tuple[Any, ...], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> "TrainingStream":
        self.device = torch.device(device)
        return self

    def plan(self, batch_size: int, seed: int) -> StreamPlan:
        return StreamPlan(self.index, seed, self.rank, self.world_size, batch_size, self.shuffle_buffer)

    def batches(self, batch_size: int, seed: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of this rank's rows for a stage's stream `seed`, from batch `skip` on (the batches
        before it are planned, not read)."""
        return self._run(self.plan(batch_size, seed).events(skip))

    def _run(self, events: Iterator[Load | Batch]) -> Iterator[dict[str, torch.Tensor]]:
        reader = UnitReader(self.index)
        pool = ThreadPoolExecutor(1, thread_name_prefix="fluxtune-stream")
        ahead: deque[tuple[Load | Batch, Future | None]] = deque()
        live: dict[int, Row] = {}
        loads_ahead = rows_ahead = 0
        try:
            while True:
                while not ahead or loads_ahead < self.prefetch:  # keep `prefetch` unit reads under way
                    event = next(events)
                    future = pool.submit(self._read, reader, event) if isinstance(event, Load) else None
                    ahead.append((event, future))
                    if future is not None:
                        loads_ahead, rows_ahead = loads_ahead + 1, rows_ahead + len(event.rows)
                self.stats.peak_rows_held = max(self.stats.peak_rows_held, len(live) + rows_ahead)
                event, future = ahead.popleft()
                if future is not None:
                    loads_ahead, rows_ahead = loads_ahead - 1, rows_ahead - len(event.rows)
                    live.update(future.result())
                    continue
                self.stats.batches += 1
                yield self._assemble(event.rows, [live.pop(row) for row in event.rows.tolist()])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, reader: UnitReader, load: Load) -> dict[int, Row]:
        rows = reader.read(load.unit, load.rows)
        self.stats.units_read += 1
        self.stats.rows_read += len(rows)
        for index in {prompt for _, _, prompt in rows.values()}:
            self.prompts.get(index)  # warm the prompt table here, off the training thread
        return rows

    def _assemble(self, ids: np.ndarray, rows: list[Row]) -> dict[str, torch.Tensor]:
        buckets = set(self.index.bucket[ids].tolist())
        assert len(buckets) == 1, "a batch must come from a single bucket"
        embeds, pooled = self.prompts.rows([prompt for _, _, prompt in rows])
        batch = {
            "x0": self._tensor([x0 for x0, _, _ in rows]),
            "cond": self._tensor([cond for _, cond, _ in rows]),
            "prompt_embeds": self._tensor(embeds),
            "pooled": self._tensor(pooled),
        }
        height, width = self.index.sizes[buckets.pop()]
        return {**batch, "mask": batch["cond"][..., 64:], **self._positions(height, width, embeds[0].shape[0])}

    def _tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Rows in the stored dtype → one float32 batch on the device."""
        if self.device.type == "cuda":  # copy the stored dtype (half the bytes), upcast on the device
            return torch.from_numpy(np.stack(arrays)).pin_memory().to(self.device, non_blocking=True).float()
        out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.float32)
        for i, array in enumerate(arrays):  # stack and upcast in one pass
            out[i].copy_(torch.from_numpy(array))
        return out

    def _positions(self, height: int, width: int, text_length: int) -> dict[str, torch.Tensor]:
        key = (height, width, text_length, str(self.device))
        if key not in self._position_ids:
            f = self.vae_scale_factor
            self._position_ids[key] = {"img_ids": latent_image_ids(height, width, f, device=self.device),
                                       "txt_ids": text_ids(text_length, device=self.device),
                                       **grid_size(height // (2 * f), width // (2 * f))}
        return self._position_ids[key]


def grid_size(rows: int, columns: int) -> dict[str, torch.Tensor]:
    """The batch's `height`/`width`: its image-token grid (rows × columns of packed 2×2 latent cells), as 0-dim
    CPU tensors so a loss can read them without a device sync."""
    return {"height": torch.tensor(rows), "width": torch.tensor(columns)}


def read_examples(index: CacheIndex, prompts: PromptTable, rows: np.ndarray) -> dict[str, Any]:
    """These rows (ids, in this order) whole, as the columns `encoded_from_columns` takes, with a prompt table
    of just their prompts."""
    reader = UnitReader(index)
    units = index.row_unit[rows]
    found: dict[int, Row] = {}
    for unit in np.unique(units):
        found.update(reader.read(int(unit), rows[units == unit]))
    ordered = [found[row] for row in rows.tolist()]
    used = list(dict.fromkeys(prompt for _, _, prompt in ordered))
    position = {prompt: i for i, prompt in enumerate(used)}
    sizes = [index.sizes[b] for b in index.bucket[rows]]
    columns = {
        "x0": _objects([x0 for x0, _, _ in ordered]), "cond": _objects([cond for _, cond, _ in ordered]),
        "prompt_index": np.array([position[prompt] for _, _, prompt in ordered], dtype=np.int64),
        "height": np.array([h for h, _ in sizes]), "width": np.array([w for _, w in sizes]),
    }
    return {"rows": columns, "prompts": prompts.table(used)}


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out
