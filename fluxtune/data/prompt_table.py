"""Prompt embeddings read on demand from the latent cache's prompt table, at most `capacity` held at a time.

A real T5 embedding is 512 × 4096 values (4 MiB in float16) per distinct prompt, so a dataset of captions cannot
be held whole by every worker. Only the index (prompt → file and row group) is read up front; embeddings are read
by row group when a row needs one and kept in a least-recently-used table of `capacity` prompts: at most
`capacity` embeddings (+ one row group while it is read) per worker, whatever the number of prompts. A table
with at most `capacity` prompts simply ends up held whole. Safe to share between the reading thread and the
training loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from fluxtune.data.cache_format import tensor_rows
from fluxtune.data.cache_index import open_parquet, parquet_files


class PromptTable:
    def __init__(self, prompts_dir: str, capacity: int):
        if capacity < 1:
            raise ValueError("the prompt cache must hold at least one prompt")
        self.capacity = capacity
        self._files = parquet_files(prompts_dir)
        self._where: dict[int, tuple[int, int]] = {}  # prompt index → (file, row group)
        for number, path in enumerate(self._files):
            parquet = open_parquet(path)
            indices = parquet.read(columns=["prompt_index"]).column("prompt_index").to_numpy()
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            for index, group in zip(indices.tolist(), np.repeat(np.arange(len(sizes)), sizes).tolist()):
                self._where[index] = (number, group)
        if sorted(self._where) != list(range(len(self._where))):
            raise ValueError(f"the prompt table in {prompts_dir} must hold each index 0..P-1 exactly once")
        self._held: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # row groups read so far

    def __len__(self) -> int:
        return len(self._where)

    @property
    def held(self) -> int:
        return len(self._held)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [L, D], pooled [P]) of one prompt, in the cache's dtype."""
        with self._lock:
            if index in self._held:
                self._held.move_to_end(index)
                return self._held[index]
        if index not in self._where:
            raise KeyError(f"prompt index {index} is not in the prompt table ({len(self)} prompts)")
        file, group = self._where[index]
        table = open_parquet(self._files[file]).read_row_group(
            group, columns=["prompt_index", "prompt_embeds", "pooled"])
        rows = zip(table.column("prompt_index").to_pylist(), tensor_rows(table, "prompt_embeds"),
                   tensor_rows(table, "pooled"))
        with self._lock:
            self.reads += 1
            wanted = None
            for i, embeds, pooled in rows:
                if i == index:
                    wanted = (embeds, pooled)
                elif i not in self._held:
                    self._store(i, (embeds, pooled))
            self._store(index, wanted)  # last: the one asked for is the most recently used
            return wanted

    def _store(self, index: int, value: tuple[np.ndarray, np.ndarray]) -> None:
        self._held[index] = value
        self._held.move_to_end(index)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    def rows(self, indices: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(prompt_embeds rows, pooled rows) for these prompt indices, in order (rows shared, not copied)."""
        found = {i: self.get(i) for i in dict.fromkeys(indices)}
        return [found[i][0] for i in indices], [found[i][1] for i in indices]

    def table(self, indices: list[int]) -> dict[str, np.ndarray]:
        """These prompts as a small prompt table (prompt_index 0..n-1 in the order given), for `EncodedSet`s."""
        embeds, pooled = self.rows(indices)
        return {"prompt_index": np.arange(len(indices)), "prompt_embeds": np.stack(embeds), "pooled": np.stack(pooled)}
