"""Where fluxtune reaches past Ray's and MLflow's public APIs, and the tests that fail when upstream moves.

Private Ray or MLflow names appear in one module per outside system (`fluxtune/train/ray_private.py`,
`fluxtune/tracking/mlflow_private.py`). Each workaround has a test below that fails the day its reason goes away
(a public replacement appears) or the private name stops working as relied upon.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fluxtune

PACKAGE = Path(fluxtune.__file__).parent
FENCES = {"ray": "fluxtune/train/ray_private.py", "mlflow": "fluxtune/tracking/mlflow_private.py"}
# Not private by name, but outside the documented API: only the fence may import them.
UNDOCUMENTED = ("mlflow.system_metrics.metrics",)


def _private_uses(path: Path) -> list[str]:
    """Imports of `ray._x`/`mlflow._x`-style modules, undocumented modules, and `._x` attributes read off
    anything that is not `self`/`cls` (e.g. `run.data._metric_objs`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] in ("ray", "mlflow") and (any(p.startswith("_") for p in parts)
                                                  or name.startswith(UNDOCUMENTED)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Attribute)):  # x.y._z: a private attribute of another object
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reads .{node.attr}")
    return found


def test_private_ray_and_mlflow_apis_are_used_only_in_their_fence_module():
    allowed = {PACKAGE.parent / p for p in FENCES.values()}
    found = [use for path in sorted(PACKAGE.rglob("*.py")) if path not in allowed for use in _private_uses(path)]
    assert found == []
    for fence in FENCES.values():  # the scan sees what the fences do (else this test could pass blind)
        assert _private_uses(PACKAGE.parent / fence), fence


# -- MLflow: the latest step of each metric


def test_mlflow_still_has_no_public_way_to_read_the_latest_step_of_each_metric(tmp_path):
    """When this fails, MLflow has a public accessor (e.g. `RunData.metric_objects()`): use it in
    `latest_steps` and drop the private read."""
    from mlflow import MlflowClient
    from mlflow.entities import RunData

    assert not [name for name in dir(RunData) if "metric" in name and not name.startswith("_")
                and name not in ("metrics", "from_proto", "from_dictionary")], dir(RunData)
    from fluxtune.tracking.mlflow_private import latest_steps

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("fence")).info.run_id
    for step, value in ((3, 0.5), (7, 0.2), (5, 0.3)):  # logged out of order: the latest is the largest step
        client.log_metric(run_id, "loss", value, step=step)
    client.log_metric(run_id, "val_loss", 1.0, step=0)
    assert latest_steps(client.get_run(run_id)) == {"loss": 7, "val_loss": 0}


# -- MLflow: system metrics sampled without a run in the process


def test_mlflow_system_metrics_still_need_a_run_in_the_sampling_process():
    """When this fails, `mlflow.system_metrics` has grown (a public sampler, or logging to another process's
    run): see whether `SystemSampler` can use it."""
    import mlflow.system_metrics as system_metrics

    public = {name for name in dir(system_metrics) if not name.startswith("_") and callable(getattr(system_metrics, name))}
    assert public == {"disable_system_metrics_logging", "enable_system_metrics_logging", "set_system_metrics_node_id",
                      "set_system_metrics_samples_before_logging", "set_system_metrics_sampling_interval"}


def test_the_system_sampler_reads_this_node_with_mlflows_names():
    from fluxtune.tracking.mlflow_private import SystemSampler

    sample = SystemSampler().sample()
    assert 0 <= sample["system/cpu_utilization_percentage"] <= 100
    assert 0 < sample["system/system_memory_usage_percentage"] <= 100
    assert sample["system/system_memory_usage_megabytes"] > 0


# -- Ray: token auth for a cluster started with `ray start`

AUTH_MODE = """
import os
import ray  # the process reads its auth mode here
from ray._raylet import AuthenticationMode, get_authentication_mode
{change}
print(get_authentication_mode() == AuthenticationMode.TOKEN)
"""
FENCE = "from fluxtune.train.ray_private import enable_token_auth; enable_token_auth()"


def _auth_mode_after(change: str, home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """Whether a process that imported ray is in token mode after `change`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PYTHONPATH=str(PACKAGE.parent), **env_vars)
    return subprocess.run([sys.executable, "-c", AUTH_MODE.format(change=change)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_ray_still_ignores_RAY_AUTH_MODE_set_after_import(tmp_path):
    """When this fails, a driver that already imported ray follows RAY_AUTH_MODE by itself: `ray_private`
    can go (set the variable, and run `ray get-auth-token --generate` for the token)."""
    done = _auth_mode_after("os.environ['RAY_AUTH_MODE'] = 'token'", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_fence_turns_token_auth_on_and_creates_the_token(tmp_path):
    done = _auth_mode_after(FENCE, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_size > 0 and token.read_text() not in done.stdout + done.stderr


def test_the_fence_keeps_a_mode_the_user_chose(tmp_path):
    done = _auth_mode_after(FENCE, tmp_path, RAY_AUTH_MODE="disabled")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    assert not (tmp_path / ".ray" / "auth_token").exists()


# -- Ray: the placement group of a stopped trial, removed through public APIs


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from fluxtune.train.cluster import start_ray

    local = start_ray(None, 2)
    yield
    ray.shutdown()
    if local is not None:
        local.stop()


def test_the_stop_board_removes_the_placement_group_of_a_stopped_trial(ray_cluster):
    """The worker sends its PlacementGroup object itself to the board (no private id type to rebuild it from)."""
    import time

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from fluxtune.train.stops import StopBoard

    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready(), timeout=60)
    board = StopBoard.remote(grace_s=0.5)  # a sweep's board waits PLACEMENT_GROUP_GRACE_S
    ray.get(board.register.remote("t1", group))
    ray.get(board.stop.remote("t1"))
    assert ray.get(board.is_stopped.remote("t1"))
    assert placement_group_table(group)["state"] != "REMOVED"  # a run that ends by itself gets its grace
    deadline = time.monotonic() + 60
    while placement_group_table(group)["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert placement_group_table(group)["state"] == "REMOVED"


# -- Ray: a trial function returns only after Tune took its Train run's last report


def test_the_train_session_still_hands_reports_over_through_the_queues_the_fence_waits_on():
    """When this fails, Ray changed how a Train run's reports reach Tune: check whether a trial that returns right
    after `fit()` can still hang, and drop `wait_for_the_last_report` if not."""
    import inspect

    from ray.train._internal import session

    source = inspect.getsource(session._TrainSession)
    assert "self._inter_actor_queue" in source and "self.result_queue" in source
    assert session.get_session() is None  # outside a run: the fence returns at once


@pytest.mark.timeout(60)  # a hang detector: outside a run there is nothing to wait for (the default waits 600 s)
def test_the_fence_returns_at_once_outside_a_train_run():
    from fluxtune.train.ray_private import wait_for_the_last_report

    assert wait_for_the_last_report() is None


# -- Tune: a restored sweep runs with this process's callbacks


def test_tuner_restore_still_takes_no_callbacks_or_stop_condition():
    """When this fails, `Tuner.restore` accepts new callbacks (or a run config): pass them there and drop
    `restore_tuner`'s private `_local_tuner`."""
    import inspect

    from ray import tune

    parameters = inspect.signature(tune.Tuner.restore).parameters
    assert not {"callbacks", "stop", "run_config"} & set(parameters)
    assert hasattr(tune.Tuner, "__init__") and "_local_tuner" in inspect.getsource(tune.Tuner.__init__)


# -- Ray Train: the variable the local cluster sets to start no preemption watcher


def test_ray_train_still_reads_the_preemption_watcher_switch_the_local_cluster_sets():
    """When this fails, Ray Train renamed or dropped the switch: a local sweep starts one more actor per trial
    again (or none at all): update LOCAL_CLUSTER_ENV in fluxtune/train/local_ray.py."""
    import inspect

    from ray.train.v2._internal.execution.controller import controller

    from fluxtune.train.local_ray import LOCAL_CLUSTER_ENV

    [name] = LOCAL_CLUSTER_ENV
    assert controller.ENABLE_PREEMPTION_WATCHER_ENV_VAR == name
    assert "PreemptionCallback()" in inspect.getsource(controller.TrainController.__init__)


# -- Tune: a failed save of its state that only says Tune raced with its own temporary file


def test_tune_still_writes_its_searcher_state_through_a_temporary_file_in_the_folder_it_copies_meanwhile():
    """When this fails, Tune names or writes its temporary files differently, or no longer copies its state folder
    while writing the next state: update or drop `tune_raced_itself` (fluxtune/search/guard.py)."""
    import inspect

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.search.searcher import Searcher

    save = inspect.getsource(Searcher.save_to_dir)
    assert 'f".{str(uuid.uuid4())}-tmp-{file_name}"' in save and "os.replace" in save
    sync = inspect.getsource(_ExperimentCheckpointManager.sync_up_experiment_state)
    assert sync.index("save_fn()") < sync.index("self._storage.syncer.sync_up(")


# -- Ray Train: a run without datasets starts no DatasetManager actor


def test_ray_train_still_starts_a_dataset_manager_for_a_run_without_datasets():
    """When this fails, Ray Train leaves the DatasetsCallback (and its actor) out when there are no datasets: use
    TorchTrainer directly instead of `torch_trainer` (fluxtune/train/ray_private.py)."""
    import inspect

    from ray.train.v2._internal.callbacks import datasets
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    defaults = inspect.getsource(DataParallelTrainer._create_default_callbacks)
    assert "datasets_callback = DatasetsCallback(" in defaults and "if self.datasets" not in defaults
    assert "ray.remote(DatasetManager)" in inspect.getsource(datasets.RayDatasetShardProvider.__init__)


def test_the_fenced_trainer_leaves_the_datasets_callback_out_only_without_datasets():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from fluxtune.train.ray_private import torch_trainer

    def kinds(trainer) -> set[type]:
        return {type(callback) for callback in trainer._create_default_callbacks()}

    plain = torch_trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    fed = torch_trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                        datasets={"train": lambda: None})  # a dataset factory (not called here: no Ray started)
    assert isinstance(plain, TorchTrainer)
    assert DatasetsCallback not in kinds(plain) and DatasetsCallback in kinds(fed)
    assert kinds(plain) | {DatasetsCallback} == kinds(fed)  # nothing else left out
