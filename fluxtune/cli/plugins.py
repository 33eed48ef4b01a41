"""`fluxtune plugins`: which plugins are loaded, from which package and version, and what each registers."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape

from fluxtune.cli.errors import error_boundary
from fluxtune.cli.console import console


def describe(include_builtins: bool) -> list[dict[str, Any]]:
    """One record per loaded plugin: provenance, registered components by kind, CLI commands."""
    from fluxtune.plugins import command_names, plugin_manager
    from fluxtune.registry import registry

    pm, infos = plugin_manager()
    entries = registry().by_plugin()
    commands = command_names(pm)
    out = []
    for name, info in infos.items():
        if info.builtin and not include_builtins:
            continue
        registers: dict[str, list[dict[str, str]]] = {}
        for entry in entries.get(name, []):
            item = {"name": entry.name, "doc": entry.doc}
            if entry.replaced is not None:
                item["replaces"] = str(entry.replaced)
            registers.setdefault(entry.kind, []).append(item)
        out.append({"name": name, "distribution": info.distribution, "version": info.version,
                    "builtin": info.builtin, "source": info.source, "registers": registers,
                    "commands": commands.get(name, [])})
    return out


def list_plugins(
    all_: bool = typer.Option(False, "--all", help="include fluxtune's built-in plugins"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List installed plugins with their version and what each registers (FLUXTUNE_LOAD/DISABLE_PLUGINS apply)."""
    with error_boundary():
        records = describe(include_builtins=all_)
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    if not records:
        console.print("no plugins installed (built-ins: fluxtune plugins --all)")
        return
    for record in records:
        label = "built-in" if record["builtin"] else f"{record['distribution']} {record['version']}"
        console.print(f"[bold]{escape(record['name'])}[/] ({escape(label)}) {escape(record['source'])}",
                      highlight=False, soft_wrap=True)
        for kind, items in record["registers"].items():
            for item in items:
                replaces = f" (replaces {item['replaces']})" if "replaces" in item else ""
                console.print(f"  {kind} [cyan]{escape(item['name'])}[/]: {escape(item['doc'] + replaces)}",
                              highlight=False, soft_wrap=True)
        for command in record["commands"]:
            console.print(f"  command [cyan]fluxtune {escape(command)}[/]", highlight=False, soft_wrap=True)
