"""`fluxtune ui`: the MLflow UI on the local store, bound to 127.0.0.1 unless `--host` says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

HOST_HELP = ("address to bind: 0.0.0.0 exposes every run to the network (MLflow also checks Host headers: "
             "MLFLOW_SERVER_ALLOWED_HOSTS)")


def ui(
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
    host: Annotated[str, typer.Option(help=HOST_HELP)] = "127.0.0.1",
    store: Annotated[Optional[Path], typer.Option(help="store folder with mlflow.db and artifacts/ "
                                                       "(default: $FLUXTUNE_MLFLOW_DIR, else ./mlflow)")] = None,
) -> None:
    """Serve the MLflow UI on the local store and print its URL; Ctrl-C (or SIGTERM, SIGHUP) stops it."""
    from fluxtune.cli.serve import serve
    from fluxtune.tracking.server import start_server
    from fluxtune.tracking.store import default_store_dir

    store = (store or default_store_dir()).resolve()
    serve("the MLflow server", lambda: start_server(store, port, log_path=store / "server.log", host=host),
          port, host, lambda url: _ready_lines(url, store), starting=f"starting the MLflow UI on {store} ...")


def _ready_lines(url: str, store: Path) -> list[str]:
    from fluxtune.tracking.server import experiment_links

    lines = [f"MLflow UI: {url}   (tracking URI for other shells: {url}; log: {store / 'server.log'}; "
             "Ctrl-C stops it)"]
    links = experiment_links(url)
    if links:
        lines.append("training runs (sweeps with their trials) of the latest experiments:")
        lines += [f"  {name}: {link}" for name, link in links]
    return lines
