"""`fluxtune models`: registered versions with aliases and metrics, and promotion by moving an alias."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from fluxtune.cli.console import console
from fluxtune.cli.errors import error_boundary
from fluxtune.cli.options import TrackingUriOption

app = typer.Typer(no_args_is_help=True, help="Registered models: list versions, promote one by alias.")


@app.command("list")
def list_versions(
    name: Annotated[Optional[str], typer.Argument(help="registered model (default: every model)")] = None,
    uri: TrackingUriOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable: one object per model with its "
                                                         "versions")] = False,
) -> None:
    """Versions with their aliases, metrics and lineage (sweep, trial, cycle, stage)."""
    from fluxtune.tracking.model_versions import registered_names, versions
    from fluxtune.tracking.store import tracking_uri

    uri = tracking_uri(uri)
    with error_boundary():
        names = [name] if name else registered_names(uri)
        listed = {model_name: versions(uri, model_name) for model_name in names}
    if as_json:
        typer.echo(json.dumps([{"name": n, "tracking_uri": uri, "versions": v} for n, v in listed.items()], indent=2))
        return
    if not listed:
        console.print(f"no registered models at {uri}")
        return
    for model_name, model_versions in listed.items():
        table = Table(title=f"{model_name}  ({uri})", title_justify="left")
        for column in ("version", "aliases", "metrics", "sweep", "trial", "stage"):
            table.add_column(column, no_wrap=True)  # one line per version, also when piped (grep, logs)
        for v in model_versions:
            tags = v["tags"]
            metrics = ", ".join(f"{k}={val}" for k, val in sorted(v["metrics"].items()))
            table.add_row(v["version"], ", ".join(v["aliases"]), metrics, tags.get("sweep", ""),
                          tags.get("trial", ""), f"cycle{tags.get('cycle', '?')}-{tags.get('stage', '?')}")
        console.print(table)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model")],
    version: Annotated[str, typer.Argument(help="version number")],
    alias: Annotated[str, typer.Option(help="alias to move onto the version")] = "champion",
    uri: TrackingUriOption = None,
) -> None:
    """Move an alias (default `champion`) to a version; who and when are recorded as version tags."""
    from fluxtune.tracking.model_versions import promote as move_alias
    from fluxtune.tracking.store import tracking_uri

    uri = tracking_uri(uri)
    with error_boundary():
        before = move_alias(uri, name, version, alias)
    moved = f" (was version {before})" if before and before != version else ""
    console.print(f"{name}@{alias} → version {version}{moved}")
