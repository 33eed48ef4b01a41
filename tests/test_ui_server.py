"""`fluxtune ui` and `fluxtune dashboard` as a person runs them: a taken port is one line and exit 2, a URL is only
printed for the server the command started, and closing the terminal (SIGHUP) or SIGTERM stops the server."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from conftest import FLUXTUNE, LineReader, run_cli
from fluxtune.serving import free_port, owns_port, port_in_use, start_process, stop, wait_ready
from fluxtune.tracking.server import PRIVATE_ENV


class _AnswersEverything(http.server.BaseHTTPRequestHandler):
    """Another server on the port: it says OK to /health like MLflow, and to everything else."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'OK {"experiments": []}')

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersEverything)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_mlflow_still_passes_its_server_settings_under_the_names_fluxtune_uses():
    """fluxtune starts MLflow's uvicorn app directly (one Python start-up instead of two) with the variables
    `mlflow server` sets: this fails when MLflow renames one."""
    import mlflow.environment_variables as variables
    from mlflow.server import constants

    assert PRIVATE_ENV["backend"] == constants.BACKEND_STORE_URI_ENV_VAR
    assert PRIVATE_ENV["registry"] == constants.REGISTRY_STORE_URI_ENV_VAR
    assert PRIVATE_ENV["artifact_root"] == constants.ARTIFACT_ROOT_ENV_VAR
    assert PRIVATE_ENV["serve_artifacts"] == constants.SERVE_ARTIFACTS_ENV_VAR
    assert PRIVATE_ENV["destination"] == constants.ARTIFACTS_DESTINATION_ENV_VAR
    assert PRIVATE_ENV["boot_id"] == variables._MLFLOW_SERVER_BOOT_ID.name
    assert PRIVATE_ENV["in_job_executor"] == variables._MLFLOW_IN_JOB_EXECUTOR.name
    assert PRIVATE_ENV["server_kind"] == variables._MLFLOW_SGI_NAME.name


@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_a_port_held_by_another_server_is_one_line_and_exit_2(command, other_server, tmp_path, cli_env):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "optuna.db").write_bytes(b"")  # the dashboard checks its study file first
    result = run_cli([command, "--port", str(other_server), "--store", str(tmp_path / "store")], cwd=tmp_path,
                     env=cli_env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {other_server}" in lines[0] and "--port" in lines[0]
    assert result.stdout == ""  # nothing else: never the URL of a server it did not start


def test_a_server_counts_as_up_only_when_the_process_started_owns_the_port(other_server, tmp_path):
    """The race `fluxtune ui` must not lose: its server dies (port taken) while another answers on that port."""
    from fluxtune.serving import PortInUse

    assert port_in_use(other_server) and not port_in_use(free_port())
    impostor = start_process([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    try:
        assert not owns_port(impostor, other_server)
        with pytest.raises(PortInUse):  # the probe answers, but not from our process
            wait_ready(impostor, f"http://127.0.0.1:{other_server}/health", lambda status, body: status == 200,
                       "127.0.0.1", other_server, 3, "test server", None)
    finally:
        stop(impostor)
    port = free_port()
    ours = start_process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], dict(os.environ))
    try:
        wait_ready(ours, f"http://127.0.0.1:{port}/", lambda status, body: status == 200, "127.0.0.1", port, 30,
                   "test server", None)
        assert owns_port(ours, port)
    finally:
        stop(ours)


def _serve_then_signal(args: list[str], cwd: Path, env: dict[str, str], sig: signal.Signals, ready: str,
                       check=None) -> None:
    """Run `fluxtune ARGS` in its own session (like a terminal), wait for its URL (then `check` it), send `sig`: it
    must exit and take its server with it."""
    process = subprocess.Popen([str(FLUXTUNE), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reader = LineReader(process.stdout)
    try:
        assert reader.wait_for(ready, process, timeout=180), reader.text()
        server = psutil.Process(process.pid).children()
        assert server, "no server process"
        if check is not None:
            check()
        os.kill(process.pid, sig)
        assert process.wait(timeout=60) == 0, reader.finish()
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, f"{sig.name} left the server running: {alive}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_sighup_from_a_closed_terminal_stops_the_mlflow_ui(tmp_path, cli_env):
    port = free_port()
    _serve_then_signal(["ui", "--port", str(port), "--store", str(tmp_path / "store")], tmp_path, cli_env,
                       signal.SIGHUP, f"MLflow UI: http://127.0.0.1:{port}")


def test_the_dashboard_serves_the_sweeps_studies_and_sigterm_stops_it(tmp_path, cli_env):
    import optuna

    store = tmp_path / "store"
    missing = run_cli(["dashboard", "--store", str(store)], cwd=tmp_path, env=cli_env, timeout=60)
    assert missing.returncode == 2 and "optuna.db" in missing.stderr and "fluxtune search" in missing.stderr
    store.mkdir()
    study = optuna.create_study(study_name="lora-rank-1", storage=f"sqlite:///{store / 'optuna.db'}")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()

    def lists_the_study():
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
            assert "lora-rank-1" in response.read().decode()

    _serve_then_signal(["dashboard", "--port", str(port), "--store", str(store)], tmp_path, cli_env,
                       signal.SIGTERM, f"Optuna dashboard: http://127.0.0.1:{port}", lists_the_study)


def test_a_server_ends_with_the_command_even_when_that_is_killed(tmp_path):
    """SIGKILL leaves no chance to clean up: the server gets SIGTERM from the kernel when its parent dies."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from fluxtune.serving import start_process\n"
        "child = start_process([sys.executable, '-c', 'import time; time.sleep(120)'], dict(os.environ))\n"
        "print(child.pid, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    server = psutil.Process(int(parent.stdout.readline()))
    assert server.is_running()
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs([server], timeout=30)
    assert not alive
