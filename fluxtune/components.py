"""The table of named components (stages, adapters, losses, …), filled by the `register_*` hooks (the only place
that calls them).

It notes which plugin (and which distribution and version) provided each entry, refuses duplicate names
unless a plugin asks to replace, and answers unknown names with the available ones and a did-you-mean.

Params models are closed: one that would drop unknown keys (a plain pydantic `BaseModel`, pydantic's default
`extra="ignore"`) is registered as a closed subclass of itself, so a misspelt key fails validation at its line
instead of being ignored; the factory still receives an instance of the plugin's own class. A model that sets
`extra="allow"` keeps the unknown keys (in `model_extra`) and answers for them itself.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ConfigDict

from fluxtune import plugins
from fluxtune.api import ComponentSpec, Params

KINDS = {
    "stage": "register_stages",
    "adapter": "register_adapters",
    "loss": "register_losses",
    "timestep_sampler": "register_timestep_samplers",
    "callback": "register_callbacks",
    "search_space": "register_search_spaces",
    "optimizer": "register_optimizers",
}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")  # usable as a YAML `type:` and in a search path


class ComponentError(Exception):
    """A plugin registered something wrong (duplicate name, bad params model, a failing hook)."""


class UnknownComponent(KeyError):
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.message = f"unknown {kind} {name!r} (available: {', '.join(sorted(available)) or 'none'}){hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Provenance:
    """Who registered an entry: the plugin's name and the distribution (package) and version it came from."""

    plugin: str
    distribution: str = "?"
    version: str = "?"

    def __str__(self) -> str:
        return f"{self.plugin!r} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[[Any], Any]
    params: type[BaseModel]
    doc: str
    provenance: Provenance
    replaced: Provenance | None = None  # the entry this one took over with replace=True

    @property
    def plugin(self) -> str:
        return self.provenance.plugin

    def build(self, spec: dict[str, Any] | BaseModel | None = None) -> Any:
        """Validate `spec` (without its `type` key) with this entry's params model and call the factory."""
        if isinstance(spec, BaseModel):
            spec = spec.model_dump()
        values = {k: v for k, v in (spec or {}).items() if k != "type"}
        return self.factory(self.params.model_validate(values))


def _ignores_extra(model: type[BaseModel]) -> bool:
    return model.model_config.get("extra") in (None, "ignore")


def closed(model: type[BaseModel]) -> type[BaseModel]:
    """`model` itself when it refuses (or deliberately keeps) unknown keys, else a subclass that refuses them."""
    if not _ignores_extra(model):
        return model
    return type(model.__name__, (model,), {"__module__": model.__module__, "__doc__": model.__doc__,
                                           "__qualname__": model.__qualname__,
                                           "model_config": ConfigDict(extra="forbid")})


def open_nested_models(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of fields (at any depth) whose pydantic model would ignore unknown keys. Component specs
    (`AdapterSpec`, …) are open by design: their keys are checked against the named component's own model."""
    found = []
    for name, field_info in model.model_fields.items():
        for inner in _models_in(field_info.annotation):
            if issubclass(inner, ComponentSpec) or inner is model:
                continue
            if _ignores_extra(inner):
                found.append(f"{prefix}{name}")
            else:
                found += open_nested_models(inner, f"{prefix}{name}.")
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: `Sub`, `list[Sub]`, `Sub | None`, `dict[str, Sub]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


@dataclass
class Components:
    """Every registered component by kind and name, with the plugin that provided it."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, entry: Entry, replace: bool = False) -> None:
        who = f"plugin {entry.provenance}"
        if not isinstance(entry.name, str) or not NAME.match(entry.name):
            raise ComponentError(f"{who}: {entry.kind} name {entry.name!r} must be a string of letters, digits, "
                                 "'_', '.' or '-' starting with a letter")
        if not callable(entry.factory):
            raise ComponentError(f"{who}: {entry.kind} {entry.name!r} factory must be callable, "
                                 f"got {type(entry.factory).__name__}")
        if not (isinstance(entry.params, type) and issubclass(entry.params, BaseModel)):
            raise ComponentError(f"{who}: {entry.kind} {entry.name!r} params must be a pydantic model "
                                 "(subclass fluxtune.Params)")
        open_inside = open_nested_models(entry.params)
        if open_inside:
            raise ComponentError(f"{who}: {entry.kind} {entry.name!r} params field {open_inside[0]} is a "
                                 "pydantic model that ignores unknown keys: subclass fluxtune.Params (or set "
                                 "extra='forbid') so a misspelt key fails validation")
        entry = Entry(**{**entry.__dict__, "params": closed(entry.params)})
        existing = self.entries[entry.kind].get(entry.name)
        if existing is not None:
            if not replace:
                raise ComponentError(
                    f"{entry.kind} {entry.name!r} is registered by both plugin {existing.provenance} and plugin "
                    f"{entry.provenance}; disable one (FLUXTUNE_DISABLE_PLUGINS) or register with replace=True")
            entry = Entry(**{**entry.__dict__, "replaced": existing.provenance})
        self.entries[entry.kind][entry.name] = entry

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise UnknownComponent(kind, name, list(self.entries[kind])) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def by_plugin(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for kind_entries in self.entries.values():
            for entry in kind_entries.values():
                out.setdefault(entry.plugin, []).append(entry)
        return out


def build_components(pm: pluggy.PluginManager, infos: dict[str, Any] | None = None) -> Components:
    """Call every `register_*` implementation on its own, in registration order (built-ins first).

    `infos` (plugin name → PluginInfo) supplies each plugin's distribution and version.
    """
    infos = infos or {}
    components = Components()
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: built-ins first
            info = infos.get(impl.plugin_name)
            provenance = Provenance(impl.plugin_name, getattr(info, "distribution", "?"),
                                    getattr(info, "version", "?"))

            def register(name: str, factory: Callable[[Any], Any], params: type[BaseModel] = Params,
                         doc: str = "", replace: bool = False, _by: Provenance = provenance, _kind: str = kind):
                components.add(Entry(_kind, name, factory, params, doc, _by), replace=replace)

            try:
                impl.function(register=register)
            except ComponentError:
                raise
            except Exception as exc:  # a plugin bug: name the plugin and hook instead of a bare traceback
                raise ComponentError(f"plugin {provenance}: {hook_name} failed: {type(exc).__name__}: {exc}; "
                                     f"disable it with FLUXTUNE_DISABLE_PLUGINS={impl.plugin_name}") from exc
    return components


_built: tuple[int, Components] | None = None  # (plugins.changes() it was built at, the table)


def loaded_components() -> Components:
    """The components of the loaded plugins, built from the process-wide plugin manager (again after plugins
    change)."""
    global _built
    changes = plugins.changes()
    if _built is None or _built[0] != changes:
        _built = (changes, build_components(*plugins.plugin_manager()))
    return _built[1]
