"""The Reporter a Ray Train worker uses: per-step metrics ride along with the next report.

Only reports cross the Ray boundary (eval points and stage ends), so a step costs no synchronisation;
step metrics are buffered as tensors and turned into floats once per report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import ray.train

from fluxtune.tracking.samples import encode_samples
from fluxtune.train.protocol import TrialReport


class RayReporter:
    def __init__(self, rank: int, stop_check: Any = None):
        self.rank = rank
        self._system = None  # rank 0: this node's CPU/memory/GPU use between reports (Tune forwards rank 0's only)
        if rank == 0:
            from fluxtune.tracking.mlflow_private import SystemSampler

            self._system = SystemSampler()
        self.stop_check = stop_check  # fluxtune.train.stops.StopCheck: ends runs Tune has stopped
        self._steps: dict[str, list[tuple[int, Any]]] = {}
        self._samples: list[tuple[int | None, bytes]] = []

    def attach_sample(self, png: bytes, step: int | None = None) -> None:
        """A sample-image grid (fluxtune.flux.preview): sent with the next report, at `step` or the report's."""
        self._samples.append((step, png))

    def log(self, global_step: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return  # Tune forwards rank 0's metrics only
        for key, value in metrics.items():
            self._steps.setdefault(key, []).append((global_step, value))

    def _drain(self) -> str:
        out = {k: [[s, float(v)] for s, v in values] for k, values in self._steps.items()}
        self._steps.clear()
        return json.dumps(out)

    def _system_sample(self) -> dict[str, float]:
        return self._system.sample() if self._system is not None else {}

    def _report(self, global_step: int, metrics: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The report's dict: `metrics`, this node's system use, the buffered step metrics and sample grids."""
        samples, self._samples = self._samples, []
        return TrialReport.from_worker(global_step, {**metrics, **self._system_sample()}, step_metrics=self._drain(),
                                       samples=encode_samples(samples) if samples else None, **fields).to_result()

    def _check_stopped(self) -> None:
        if self.stop_check is not None:
            self.stop_check.raise_if_stopped()

    def evaluation(self, global_step: int, metrics: dict[str, float]) -> None:
        self._check_stopped()
        ray.train.report(self._report(global_step, metrics))

    def stage_end(self, global_step: int, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from fluxtune.checkpoints import check_room, folder_bytes, store_error

        self._check_stopped()
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        destination, needed = run_folder(), folder_bytes(Path(checkpoint_dir)) if checkpoint_dir else 0
        if checkpoint_dir:  # Ray copies the checkpoint into storage: refuse before a copy that cannot finish
            check_room(destination, needed)
        try:
            ray.train.report(self._report(global_step, metrics, stage_end=True,
                                          node=ray.get_runtime_context().get_node_id()), checkpoint=checkpoint)
        except Exception as exc:  # the store filled up or turned read-only during the copy: say so plainly
            clear = store_error(exc, destination or "the trial's storage", needed) if checkpoint_dir else None
            if clear is None:
                raise
            raise clear from exc


def run_folder() -> str | None:
    """Where Ray Train keeps this run's checkpoints: a local folder, or None (an object store, or no Train)."""
    try:
        context = ray.train.get_context().get_storage()
    except Exception:  # local mode, or a Ray without the (developer) storage API
        return None
    import pyarrow.fs as pafs

    if not isinstance(context.storage_filesystem, pafs.LocalFileSystem):
        return None
    return context.experiment_fs_path
