"""Ending a trial's Ray Train run when Tune stops the trial early (ASHA, median stopping).

Tune stops a function trainable by abandoning its thread, which is blocked in `TorchTrainer.fit()`. Train
hands results to Tune through a queue of size one that nobody reads any more, so the run would block on its
next report and hold its workers' CPUs for good (later trials then wait forever). Tune soon kills the trial
actor, and with it the Train controller; Train's own placement-group cleaner needs the State API, which a local
Ray without the dashboard does not have, so the workers' placement group would stay reserved.

So: the driver marks finished trials on a small actor; rank 0 looks before every report and all ranks end the
run together; and a few seconds later the board removes the trial's placement group if it is still there.
"""

from __future__ import annotations

import threading
from typing import Any

import ray

PLACEMENT_GROUP_GRACE_S = 5.0  # time for a run to end by itself before its placement group is removed


class TrialStopped(Exception):
    """Raised in a worker when Tune no longer wants this trial's results."""


@ray.remote(num_cpus=0)
class StopBoard:
    def __init__(self, grace_s: float = PLACEMENT_GROUP_GRACE_S) -> None:
        self.finished: set[str] = set()
        self.groups: dict[str, Any] = {}
        self.grace_s = grace_s

    def register(self, trial_id: str, group: Any) -> None:
        """`group`: the trial's Train workers' PlacementGroup (it pickles, so the worker sends it as it is)."""
        self.groups[trial_id] = group

    def stop(self, trial_id: str) -> None:
        self.finished.add(trial_id)
        group = self.groups.pop(trial_id, None)
        if group:
            threading.Timer(self.grace_s, _remove_placement_group, args=(group,)).start()

    def is_stopped(self, trial_id: str) -> bool:
        return trial_id in self.finished


def _remove_placement_group(group: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # already removed by a run that ended by itself
        pass


def board_name(sweep_id: str) -> str:
    return f"fluxtune-stops-{sweep_id}"


def create_board(sweep_id: str):
    """In the driver: the sweep's board (owned by the driver, gone with it)."""
    return StopBoard.options(name=board_name(sweep_id), get_if_exists=True).remote()


class StopCheck:
    """In a worker: `raise_if_stopped()` before each report; every rank reaches the same verdict."""

    def __init__(self, sweep_id: str | None, trial_id: str | None, rank: int, world_size: int):
        self.trial_id, self.rank, self.world_size = trial_id, rank, world_size
        self._board = None
        if sweep_id and trial_id and rank == 0:
            try:
                self._board = ray.get_actor(board_name(sweep_id))
            except ValueError:  # run outside a sweep (benchmarks, tests): nothing can stop it
                self._board = None
            group = ray.util.get_current_placement_group()
            if self._board is not None and group is not None:
                self._board.register.remote(trial_id, group)

    def raise_if_stopped(self) -> None:
        stopped = bool(self._board is not None and ray.get(self._board.is_stopped.remote(self.trial_id)))
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            verdict = torch.tensor([int(stopped)])
            dist.broadcast(verdict, src=0)  # rank 0 decides, so no rank waits alone at the next report
            stopped = bool(verdict.item())
        if stopped:
            raise TrialStopped(self.trial_id)
