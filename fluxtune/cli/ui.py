"""`fluxtune ui`: the MLflow UI on the local store, bound to 127.0.0.1 unless `--host` says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def ui(
    port: int = typer.Option(5000, help="port to listen on"),
    host: str = typer.Option("127.0.0.1", help="address to bind: 0.0.0.0 exposes every run to the network "
                                                "(MLflow also checks Host headers: MLFLOW_SERVER_ALLOWED_HOSTS)"),
    store: Optional[Path] = typer.Option(None, help="store folder with mlflow.db and artifacts/ "
                                                    "(default: $FLUXTUNE_MLFLOW_DIR, else ./mlflow)"),
) -> None:
    """Start `mlflow server` on the local store and print its URL; Ctrl-C stops it."""
    from fluxtune.tracking.server import start_server, stop_server
    from fluxtune.tracking.store import default_store_dir

    store = (store or default_store_dir()).resolve()
    typer.echo(f"starting the MLflow UI on {store} ...")
    try:
        process, url = start_server(store, port, host=host)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"MLflow UI: {url}   (tracking URI for other shells: {url}; Ctrl-C stops it)")
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(process)
