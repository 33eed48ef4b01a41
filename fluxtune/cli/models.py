"""`fluxtune models`: registered versions with aliases and metrics, and promotion by moving an alias."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fluxtune.cli.errors import error_boundary

app = typer.Typer(no_args_is_help=True, help="Registered models: list versions, promote one by alias.")
console = Console(soft_wrap=True)  # lines naming files must stay whole for grep and logs
URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow)"


@app.command("list")
def list_versions(
    name: Optional[str] = typer.Argument(None, help="registered model (default: every model)"),
    uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
) -> None:
    """Versions with their aliases, metrics and lineage (sweep, trial, cycle, stage)."""
    from fluxtune.tracking.registry import registered_names, versions
    from fluxtune.tracking.store import tracking_uri

    uri = tracking_uri(uri)
    with error_boundary():
        names = [name] if name else registered_names(uri)
        if not names:
            console.print(f"no registered models at {uri}")
            return
        for model_name in names:
            table = Table(title=f"{model_name}  ({uri})")
            for column in ("version", "aliases", "metrics", "sweep", "trial", "stage"):
                table.add_column(column, overflow="fold")
            for v in versions(uri, model_name):
                tags = v["tags"]
                metrics = ", ".join(f"{k}={val}" for k, val in sorted(v["metrics"].items()))
                table.add_row(v["version"], ", ".join(v["aliases"]), metrics, tags.get("sweep", ""),
                              tags.get("trial", ""), f"cycle{tags.get('cycle', '?')}-{tags.get('stage', '?')}")
            console.print(table)


@app.command()
def promote(
    name: str = typer.Argument(..., help="registered model"),
    version: str = typer.Argument(..., help="version number"),
    alias: str = typer.Option("champion", help="alias to move onto the version"),
    uri: Optional[str] = typer.Option(None, "--tracking-uri", help=URI_HELP),
) -> None:
    """Move an alias (default `champion`) to a version; who and when are recorded as version tags."""
    from fluxtune.tracking.registry import promote as move_alias
    from fluxtune.tracking.store import tracking_uri

    uri = tracking_uri(uri)
    with error_boundary():
        before = move_alias(uri, name, version, alias)
    moved = f" (was version {before})" if before and before != version else ""
    console.print(f"{name}@{alias} → version {version}{moved}")
