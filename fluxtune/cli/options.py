"""Options that several `fluxtune` commands share, defined once (type, flag names, help) as `Annotated` types.

A command takes one as `set_: SetOption = []`; its own options are `Annotated[..., typer.Option(...)]` in its module.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

SpecArgument = Annotated[str, typer.Argument(help="search or experiment YAML")]
SetOption = Annotated[list[str], typer.Option(
    "--set", help="override a key of the file: --set base.stages.lora.steps=10 (repeatable; the value is YAML)")]
AddressOption = Annotated[Optional[str], typer.Option(
    "--address", help="existing Ray cluster (default: start a local one)")]
VerboseOption = Annotated[bool, typer.Option(
    "--verbose", "-v", help="show Ray worker logs and the INFO lines of Ray, Ray Data and MLflow")]
TrackingUriOption = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
