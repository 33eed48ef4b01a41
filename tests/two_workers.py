"""One real Ray Train run with two CPU workers, shared by every test that needs two ranks of one run.

Starting Ray and a Train worker group (a controller, two worker processes importing torch, diffusers and peft,
a gloo group) costs far more than what each test checks on it, so the checks of MODULES that need two ranks (or
just another process) run one after another in one `fit` (the `two_train_workers` fixture; its tests run on one
pytest-xdist worker, see conftest). A module takes part by defining
`two_worker_check(folder, sample_jsonl) -> (check, config)`; `check(config, rank, world)` runs on both ranks and
returns a JSON record. A check that raises stops the run (the other rank may be waiting in a collective): its own
record holds the traceback, and the checks after it say that they never ran.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

Check = Callable[[dict, int, int], dict]
MODULES = ("test_deepspeed", "test_stream_workers", "test_training_recipe", "test_tiny_vae")


def _run_checks(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    for name, (check, check_config) in config["checks"].items():
        try:
            record = {"ok": True, **check(check_config, rank, world)}
        except Exception:
            Path(config["out"], f"{name}.rank{rank}.json").write_text(
                json.dumps({"ok": False, "error": traceback.format_exc()}))
            raise
        Path(config["out"], f"{name}.rank{rank}.json").write_text(json.dumps(record))


def run_two_worker_checks(folder: Path, sample_jsonl: Path) -> dict[str, list[dict[str, Any]]]:
    """Every module's check on two workers of one Train run: {module: [rank 0 record, rank 1 record]}."""
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from fluxtune.train.cluster import start_ray
    from fluxtune.train.ray_private import torch_trainer

    checks = {}
    for name in MODULES:
        module = importlib.import_module(name)
        ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import test modules
        (folder / name).mkdir(parents=True, exist_ok=True)
        checks[name] = module.two_worker_check(folder / name, sample_jsonl)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_ray(None, 3)  # two workers and a CPU left for the trial's data reads
    failure = None
    try:
        torch_trainer(_run_checks, train_loop_config={"checks": checks, "out": str(folder)},
                      scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                      run_config=RunConfig(name="two-workers", storage_path=str(folder / "runs"))).fit()
    except Exception as exc:  # each test reports what its own check left
        failure = f"the two-worker run stopped before this check: {exc}"
    finally:
        ray.shutdown()
    records = {}
    for name in MODULES:
        files = [folder / f"{name}.rank{rank}.json" for rank in (0, 1)]
        records[name] = [json.loads(f.read_text()) if f.exists() else {"ok": False, "error": failure}
                         for f in files]
    return records


def records_of(two_train_workers: dict, module: str) -> list[dict[str, Any]]:
    """Both ranks' records of a module's check; fails the test with the check's own error if it had one."""
    records = two_train_workers[module]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank}:\n{record['error']}"
    return records
