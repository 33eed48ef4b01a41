"""The MLflow server on the default store (or any sqlite store), bound to 127.0.0.1 unless a host is given: what
`fluxtune ui` and the server tests start. Artifacts are served by the server itself, so a remote client needs no
file access. Other machines reach it only with `host="0.0.0.0"` (and MLFLOW_SERVER_ALLOWED_HOSTS for MLflow's
Host-header check): the store holds every run, so exposing it is a choice, never a default.

Start-up: `mlflow server` is a Python process that imports MLflow, sets the store up, then starts uvicorn in a
second Python process that imports it all again. fluxtune starts that uvicorn process directly, with the settings
`mlflow server` would pass it (`server_env`), and counts the server up once its store answers, not /health alone:
one import instead of two (BENCHMARKS.md, "fluxtune ui start-up"). The variable names are MLflow's private ones;
tests/test_ui_server.py fails when MLflow renames them. `mlflow_server_command` is the public equivalent.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from fluxtune.serving import HOST, PortInUse, free_port, start_process, stop, url_for, wait_ready

__all__ = ["HOST", "PortInUse", "free_port", "start_server", "stop_server", "server_env", "uvicorn_command",
           "mlflow_server_command", "runs_url", "experiment_links"]

# The UI and tracking API only: no job runner (it needs extra packages and memory), no usage telemetry (no
# network here; each attempt costs start-up time), one worker (≈0.5 GiB).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
# What `mlflow server` tells its uvicorn process (mlflow.server._run_server; names in mlflow.server.constants).
PRIVATE_ENV = {"backend": "_MLFLOW_SERVER_FILE_STORE", "registry": "_MLFLOW_SERVER_REGISTRY_STORE",
               "artifact_root": "_MLFLOW_SERVER_ARTIFACT_ROOT", "serve_artifacts": "_MLFLOW_SERVER_SERVE_ARTIFACTS",
               "destination": "_MLFLOW_SERVER_ARTIFACT_DESTINATION", "boot_id": "_MLFLOW_SERVER_BOOT_ID",
               "in_job_executor": "_MLFLOW_IN_JOB_EXECUTOR", "server_kind": "_MLFLOW_SGI_NAME"}
APP = "mlflow.server.fastapi_app:app"
READY_PATH = "/ajax-api/2.0/mlflow/experiments/search?max_results=1"  # the store itself answers (set up)


def _store(store_dir: Path) -> tuple[str, str]:
    store_dir = Path(store_dir).resolve()
    return f"sqlite:///{store_dir / 'mlflow.db'}", str(store_dir / "artifacts")


def server_env(store_dir: Path) -> dict[str, str]:
    backend, artifacts = _store(store_dir)
    return {**SERVER_ENV, PRIVATE_ENV["backend"]: backend, PRIVATE_ENV["registry"]: backend,
            PRIVATE_ENV["artifact_root"]: "mlflow-artifacts:/", PRIVATE_ENV["serve_artifacts"]: "true",
            PRIVATE_ENV["destination"]: artifacts, PRIVATE_ENV["boot_id"]: uuid.uuid4().hex,
            PRIVATE_ENV["in_job_executor"]: "false", PRIVATE_ENV["server_kind"]: "uvicorn"}


def uvicorn_command(port: int, host: str = HOST) -> list[str]:
    import importlib.util

    # MLflow's own uvicorn logging set-up, found without importing mlflow (seconds) into this process
    log_config = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "uvicorn_log_config.yaml"
    logging = ["--log-config", str(log_config)] if log_config.exists() else []
    return [sys.executable, "-m", "uvicorn", APP, *logging, "--host", host, "--port", str(port), "--workers", "1"]


def mlflow_server_command(store_dir: Path, port: int, host: str = HOST) -> list[str]:
    """The same server through MLflow's CLI (two Python start-ups): for people, docs and the benchmark."""
    backend, artifacts = _store(store_dir)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
            artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def start_server(store_dir: Path, port: int | None = None, log_path: Path | None = None,
                 timeout: float = 90.0, host: str = HOST, via_mlflow_cli: bool = False):
    """Start the server and wait until it answers as itself; returns (process, URL).

    A given `port` that is taken raises PortInUse. Without a `port` a free one is picked, and picked again if
    another process takes it before the server binds: busy machines running Ray grab ports all the time."""
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(3 if port is None else 1):
        chosen = port or free_port()
        try:
            return _start(store_dir, chosen, log_path, timeout, host, via_mlflow_cli)
        except PortInUse:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start(store_dir: Path, port: int, log_path: Path | None, timeout: float, host: str, via_mlflow_cli: bool):
    from fluxtune.serving import port_in_use

    if port_in_use(port, host):
        raise PortInUse(host, port)
    if via_mlflow_cli:
        command, env = mlflow_server_command(store_dir, port, host), {**os.environ, **SERVER_ENV}
    else:
        command, env = uvicorn_command(port, host), {**os.environ, **server_env(store_dir)}
    process = start_process(command, env, log_path)
    url = url_for(host, port)
    try:
        wait_ready(process, url + READY_PATH, lambda status, body: status == 200 and b"experiments" in body,
                   host, port, timeout, "mlflow server", log_path)
        return process, url
    except BaseException:  # never leave a server behind (Ctrl-C, a surprise from urllib)
        stop(process)
        raise


def stop_server(process, timeout: float = 15.0) -> None:
    stop(process, timeout)


# MLflow 3.17's UI opens every experiment in the view of a switch kept in the browser (default GenAI: traces, costs)
# unless the link names one: links fluxtune prints open the training runs table.
ML_VIEW = "workflowType=machine_learning"


def runs_url(url: str, experiment_id: str) -> str:
    """The experiment's training runs (sweeps with their trials nested) in the UI at `url`."""
    return f"{url}/#/experiments/{experiment_id}/runs?{ML_VIEW}"


def experiment_links(url: str, limit: int = 5) -> list[tuple[str, str]]:
    """(name, runs URL) of the experiments last updated on the server at `url`, newest first; [] if it cannot say."""
    import json
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"max_results": limit + 1, "order_by": "last_update_time DESC"})
    try:
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/search?{query}", timeout=10) as answer:
            experiments = json.loads(answer.read()).get("experiments", [])
    except (OSError, ValueError):
        return []
    named = [(e["name"], runs_url(url, e["experiment_id"])) for e in experiments if e["name"] != "Default"]
    return named[:limit]
