"""The registry of named components, filled by the `register_*` hooks (the only place that calls them).

It records which plugin (and which distribution and version) provided each entry, refuses duplicate names
unless a plugin asks to replace, and answers unknown names with the available ones and a did-you-mean.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pluggy
from pydantic import BaseModel

from fluxtune.api import Params

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


class RegistryError(Exception):
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


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, entry: Entry, replace: bool = False) -> None:
        who = f"plugin {entry.provenance}"
        if not isinstance(entry.name, str) or not NAME.match(entry.name):
            raise RegistryError(f"{who}: {entry.kind} name {entry.name!r} must be a string of letters, digits, "
                                "'_', '.' or '-' starting with a letter")
        if not callable(entry.factory):
            raise RegistryError(f"{who}: {entry.kind} {entry.name!r} factory must be callable, "
                                f"got {type(entry.factory).__name__}")
        if not (isinstance(entry.params, type) and issubclass(entry.params, BaseModel)):
            raise RegistryError(f"{who}: {entry.kind} {entry.name!r} params must be a pydantic model "
                                "(subclass fluxtune.Params)")
        existing = self.entries[entry.kind].get(entry.name)
        if existing is not None:
            if not replace:
                raise RegistryError(
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


def build_registry(pm: pluggy.PluginManager, infos: dict[str, Any] | None = None) -> Registry:
    """Call every `register_*` implementation on its own, in registration order (built-ins first).

    `infos` (plugin name → PluginInfo) supplies each plugin's distribution and version.
    """
    infos = infos or {}
    registry = Registry()
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: built-ins first
            info = infos.get(impl.plugin_name)
            provenance = Provenance(impl.plugin_name, getattr(info, "distribution", "?"),
                                    getattr(info, "version", "?"))

            def register(name: str, factory: Callable[[Any], Any], params: type[BaseModel] = Params,
                         doc: str = "", replace: bool = False, _by: Provenance = provenance, _kind: str = kind):
                registry.add(Entry(_kind, name, factory, params, doc, _by), replace=replace)

            try:
                impl.function(register=register)
            except RegistryError:
                raise
            except Exception as exc:  # a plugin bug: name the plugin and hook instead of a bare traceback
                raise RegistryError(f"plugin {provenance}: {hook_name} failed: {type(exc).__name__}: {exc}; "
                                    f"disable it with FLUXTUNE_DISABLE_PLUGINS={impl.plugin_name}") from exc
    return registry


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, built from the process-wide plugin manager."""
    from fluxtune.plugins import plugin_manager

    return build_registry(*plugin_manager())
