"""The local Ray cluster a command starts ends with it: after a clean stop no process of its session is left and its
temp dir is gone; its workers run without what a one-node cluster never needs (a SIGKILLed driver is covered end to end in tests/test_faults.py)."""

from __future__ import annotations

import os
from pathlib import Path

from fluxtune.train.local_ray import session_pids, start_local_ray


def test_a_clean_stop_leaves_no_ray_process_and_no_temp_dir():
    import ray

    local = start_local_ray(num_cpus=1)
    try:
        ray.init(address=local.address, logging_level="ERROR")
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        # one node that nothing drains: Ray Train's preemption watcher (an actor per trial) is not started
        watcher = ray.get(ray.remote(lambda: os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")).remote())
        assert watcher == os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        assert len(session_pids(local.session)) > 2  # the keeper, GCS, raylet, a worker …
    finally:
        local.stop()
    assert session_pids(local.session) == [] and local.keeper.returncode == 0
    assert not Path(local.temp_dir).exists()
