"""`mlflow server` on the default store (or any sqlite store), bound to 127.0.0.1: what `fluxtune ui` and the
server tests start. Artifacts are served by the server itself, so a remote client needs no file access."""

from __future__ import annotations

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
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start the server in its own process group and wait until /health answers; returns (process, URL)."""
    port = port or free_port()
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(server_command(store_dir, port), stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **SERVER_ENV}, start_new_session=True)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode} (log: {log_path or 'not kept'})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:.0f} s (log: {log_path})")


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
