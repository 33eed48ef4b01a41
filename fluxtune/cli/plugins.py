"""`fluxtune plugins`: which plugins are loaded, from which package and version, what each registers, and (with
`--params`) every component's parameters with their types, defaults, limits and descriptions."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.markup import escape

from fluxtune.cli.console import console
from fluxtune.cli.errors import error_boundary
from fluxtune.cli.options import JsonOption

_LIMITS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤",
           "multiple_of": "multiple of"}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return repr(annotation).replace("typing.", "").replace("NoneType", "None")


def _limits(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, symbol in _LIMITS.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def params_of(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One dict per field of a params model: name, type, default (or required), limits, description."""
    out = []
    for name, field in model.model_fields.items():
        required = field.is_required()
        if required:
            default = None
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = None if field.default is PydanticUndefined else field.default
        if isinstance(default, BaseModel):
            default = default.model_dump()
        out.append({"name": name, "type": _type_name(field.annotation), "required": required,
                    "default": default, "limits": _limits(field.metadata), "description": field.description or ""})
    return out


def _model_doc(model: type[BaseModel]) -> str:
    from fluxtune.api import Params

    doc = model.__doc__ if model is not Params else None
    return " ".join(doc.split()) if doc else ""


def describe(include_builtins: bool, with_params: bool = False) -> list[dict[str, Any]]:
    """One description per loaded plugin: provenance, registered components by kind, CLI commands."""
    from fluxtune.components import loaded_components
    from fluxtune.plugins import command_names, plugin_manager

    pm, infos = plugin_manager()
    entries = loaded_components().by_plugin()
    commands = command_names(pm)
    out = []
    for name, info in infos.items():
        if info.builtin and not include_builtins:
            continue
        registers: dict[str, list[dict[str, Any]]] = {}
        for entry in entries.get(name, []):
            item: dict[str, Any] = {"name": entry.name, "doc": entry.doc}
            if entry.replaced is not None:
                item["replaces"] = str(entry.replaced)
            if with_params:
                item["params_doc"] = _model_doc(entry.params)
                item["params"] = params_of(entry.params)
            registers.setdefault(entry.kind, []).append(item)
        out.append({"name": name, "distribution": info.distribution, "version": info.version,
                    "builtin": info.builtin, "source": info.source, "registers": registers,
                    "commands": commands.get(name, [])})
    return out


def _param_line(param: dict[str, Any]) -> str:
    value = "required" if param["required"] else f"= {param['default']!r}"
    limits = f" ({param['limits']})" if param["limits"] else ""
    description = f": {param['description']}" if param["description"] else ""
    return f"      {param['name']}: {param['type']} {value}{limits}{description}"


def list_plugins(
    all_: Annotated[bool, typer.Option("--all", help="include fluxtune's built-in plugins")] = False,
    params: Annotated[bool, typer.Option("--params", help="show each component's parameters: type, default, "
                                                          "limits and description")] = False,
    as_json: JsonOption = False,
) -> None:
    """List installed plugins with their version and what each registers (FLUXTUNE_LOAD/DISABLE_PLUGINS apply)."""
    with error_boundary():
        descriptions = describe(include_builtins=all_, with_params=params)
    if as_json:
        typer.echo(json.dumps(descriptions, indent=2, default=repr))
        return
    if not descriptions:
        console.print("no plugins installed (built-ins: fluxtune plugins --all)")
        return
    for plugin in descriptions:
        label = "built-in" if plugin["builtin"] else f"{plugin['distribution']} {plugin['version']}"
        console.print(f"[bold]{escape(plugin['name'])}[/] ({escape(label)}) {escape(plugin['source'])}",
                      highlight=False, soft_wrap=True)
        for kind, items in plugin["registers"].items():
            for item in items:
                replaces = f" (replaces {item['replaces']})" if "replaces" in item else ""
                console.print(f"  {kind} [cyan]{escape(item['name'])}[/]: {escape(item['doc'] + replaces)}",
                              highlight=False, soft_wrap=True)
                if params:
                    if item["params_doc"]:
                        console.print(f"      {escape(item['params_doc'])}", highlight=False, soft_wrap=True)
                    for param in item["params"] or [{"none": True}]:
                        line = "      (no parameters)" if "none" in param else _param_line(param)
                        console.print(escape(line), highlight=False, soft_wrap=True)
        for command in plugin["commands"]:
            console.print(f"  command [cyan]fluxtune {escape(command)}[/]", highlight=False, soft_wrap=True)
