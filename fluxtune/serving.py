"""A local web server fluxtune starts as a child process (the MLflow UI, the Optuna dashboard): in its own process
group, dying with its parent, reported only once *it* answers on its port, stopped with its whole group.

"Healthy" alone is not enough: another server already on the port answers /health too. A server counts as up
when its readiness probe answers and the port's listening socket belongs to the process started (or one of its
children). Subprocess and socket handling only; what each server runs and probes is its caller's business.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"


class PortInUse(RuntimeError):
    """Someone else listens on the port (before the start, or took it before our server could bind)."""

    def __init__(self, host: str, port: int):
        super().__init__(f"port {port} on {host} is in use")
        self.host, self.port = host, port


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on (host, port): binding it would fail (what the server would find)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for a server
        try:
            s.bind((host, port))
        except OSError:
            return True
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    with socket.socket(socket.AF_INET6 if ":" in probe else socket.AF_INET) as s:
        return s.connect_ex((probe, port)) == 0  # a wildcard listener elsewhere also takes our address's calls


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def start_process(command: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """The server in its own process group (a terminal's Ctrl-C reaches us, and we stop it ourselves)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
    finally:
        if log_path:
            log.close()  # the child holds its own descriptor


def owns_port(process: subprocess.Popen, port: int) -> bool:
    """Whether `process` or one of its descendants holds the listening socket on `port`."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in family:
        try:
            connections = member.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections):
            return True
    return False


def answers(url: str, expect: Callable[[int, bytes], bool], timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return expect(response.status, response.read())
    except (OSError, http.client.HTTPException, ValueError):  # not up yet, or someone else's socket answered
        return False


def wait_ready(process: subprocess.Popen, probe_url: str, expect: Callable[[int, bytes], bool], host: str, port: int,
               timeout: float, what: str, log_path: Path | None) -> None:
    """Until the probe answers and `process` owns the port; PortInUse when the server lost the port to another."""
    deadline = time.monotonic() + timeout
    log = f"log: {log_path}" if log_path else "log not kept"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if port_in_use(port, host):
                raise PortInUse(host, port)
            raise RuntimeError(f"{what} exited with {process.returncode} ({log})")
        if answers(probe_url, expect) and owns_port(process, port):
            return
        time.sleep(0.2)
    if port_in_use(port, host) and not owns_port(process, port):
        raise PortInUse(host, port)
    raise RuntimeError(f"{what} did not answer at {probe_url} within {timeout:.0f} s ({log})")


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # ended between the poll and the signal
        process.wait()


def url_for(host: str, port: int) -> str:
    return f"http://{HOST if host in ('0.0.0.0', '::', '') else host}:{port}"  # a wildcard answers on loopback
