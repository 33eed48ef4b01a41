"""`mlflow server` on the default store (or any sqlite store), bound to 127.0.0.1 unless a host is given: what
`fluxtune ui` and the server tests start. Artifacts are served by the server itself, so a remote client needs no
file access. Other machines reach it only with `host="0.0.0.0"` (and MLFLOW_SERVER_ALLOWED_HOSTS for MLflow's
Host-header check): the store holds every run, so exposing it is a choice, never a default."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
# The UI and tracking API only: no job runner (it needs extra packages and memory), one worker (≈0.5 GiB).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(store_dir: Path, port: int, host: str = HOST) -> list[str]:
    store_dir = Path(store_dir).resolve()
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}",
            "--artifacts-destination", str(store_dir / "artifacts"),
            "--host", host, "--port", str(port), "--workers", "1"]


def start_server(store_dir: Path, port: int | None = None, log_path: Path | None = None,
                 timeout: float = 60.0, host: str = HOST) -> tuple[subprocess.Popen, str]:
    """Start the server in its own process group and wait until /health answers; returns (process, URL).

    Without a `port` a free one is picked, and picked again if another process takes it before the server binds
    (the server then exits): busy machines running Ray grab ports all the time."""
    for attempt in range(3 if port is None else 1):
        try:
            return _start(store_dir, port or free_port(), log_path, timeout, host)
        except _PortTaken:
            continue
    raise RuntimeError(f"mlflow server could not bind a port (log: {log_path or 'not kept'})")


class _PortTaken(RuntimeError):
    pass


def _start(store_dir: Path, port: int, log_path: Path | None, timeout: float,
           host: str) -> tuple[subprocess.Popen, str]:
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(server_command(store_dir, port, host), stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **SERVER_ENV}, start_new_session=True)
    url = f"http://{HOST if host in ('0.0.0.0', '::') else host}:{port}"  # a wildcard bind answers on loopback
    try:
        return _wait_healthy(process, url, port, log_path, timeout)
    except BaseException:  # never leave a server behind (Ctrl-C, a surprise from urllib)
        stop_server(process)
        raise


def _wait_healthy(process: subprocess.Popen, url: str, port: int, log_path: Path | None,
                  timeout: float) -> tuple[subprocess.Popen, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if _port_in_use(port):
                raise _PortTaken(port)
            raise RuntimeError(f"mlflow server exited with {process.returncode} (log: {log_path or 'not kept'})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"OK":
                    return process, url
        except (OSError, http.client.HTTPException):  # not up yet, or someone else's socket answered
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:.0f} s (log: {log_path})")


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def stop_server(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the server's process group (its gunicorn/uvicorn workers too), SIGKILL if it lingers."""
    import signal

    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
