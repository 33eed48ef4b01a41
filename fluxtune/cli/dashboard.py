"""`fluxtune dashboard`: optuna-dashboard on the sweeps' Optuna studies (`optuna.db` beside the local MLflow store),
bound to 127.0.0.1 unless `--host` says otherwise; the same port and signal behaviour as `fluxtune ui`.

The dashboard runs as its own process (optuna-dashboard's console entry point): nothing here imports optuna."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

STUDY_DB = "optuna.db"  # fluxtune.search.space.optuna_storage_url: beside a local store's mlflow.db


def dashboard_command(storage_url: str, port: int, host: str) -> list[str]:
    # its console script's entry point, run by this Python (the venv's script may not be on PATH)
    return [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; sys.exit(main())", storage_url,
            "--host", host, "--port", str(port), "--quiet"]


def start_dashboard(study_db: Path, port: int, host: str = "127.0.0.1", log_path: Path | None = None,
                    timeout: float = 60.0):
    """Start optuna-dashboard on `study_db` and wait until it answers as itself; returns (process, URL)."""
    from fluxtune.serving import PortInUse, port_in_use, start_process, stop, url_for, wait_ready

    if port_in_use(port, host):
        raise PortInUse(host, port)
    process = start_process(dashboard_command(f"sqlite:///{Path(study_db).resolve()}", port, host),
                            dict(os.environ), log_path)
    url = url_for(host, port)
    try:
        wait_ready(process, f"{url}/api/meta", _is_dashboard_meta, host, port, timeout, "optuna-dashboard", log_path)
        return process, url
    except BaseException:
        stop(process)
        raise


def _is_dashboard_meta(status: int, body: bytes) -> bool:
    try:
        return status == 200 and isinstance(json.loads(body), dict)
    except ValueError:
        return False


def dashboard(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    host: Annotated[str, typer.Option(help="address to bind: 0.0.0.0 exposes every study to the network")] = (
        "127.0.0.1"),
    store: Annotated[Optional[Path], typer.Option(help=f"store folder holding {STUDY_DB} (default: "
                                                       "$FLUXTUNE_MLFLOW_DIR, else ./mlflow)")] = None,
) -> None:
    """Serve optuna-dashboard on the sweeps' Optuna studies (trials, parameter importances, history); Ctrl-C (or
    SIGTERM, SIGHUP) stops it."""
    from fluxtune.cli.serve import serve
    from fluxtune.tracking.store import default_store_dir

    store = (store or default_store_dir()).resolve()
    study_db = store / STUDY_DB
    if not study_db.is_file():  # the dashboard would create an empty one and show nothing
        typer.echo(f"error: {study_db}: no Optuna studies here yet: run `fluxtune search FILE` first, or pass "
                   "--store", err=True)
        raise typer.Exit(2)
    serve("optuna-dashboard", lambda: start_dashboard(study_db, port, host, log_path=store / "dashboard.log"),
          port, host, lambda url: [f"Optuna dashboard: {url}   (studies in {study_db}; Ctrl-C stops it)"],
          starting=f"starting optuna-dashboard on {study_db} ...")
