"""The registry of named components, filled by the `register_*` hooks (the only place that calls them).

It records which plugin provided each entry, refuses duplicate names unless a plugin asks to replace, and
answers unknown names with the available ones and a did-you-mean.
"""

from __future__ import annotations

import difflib
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
}


class RegistryError(Exception):
    """A plugin registered something wrong (duplicate name, bad params model)."""


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
class Entry:
    kind: str
    name: str
    factory: Callable[[Any], Any]
    params: type[BaseModel]
    doc: str
    plugin: str  # plugin name as the plugin manager knows it

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
        if not (isinstance(entry.params, type) and issubclass(entry.params, BaseModel)):
            raise RegistryError(f"plugin {entry.plugin!r}: {entry.kind} {entry.name!r} params must be a pydantic model")
        existing = self.entries[entry.kind].get(entry.name)
        if existing is not None and not replace:
            raise RegistryError(
                f"{entry.kind} {entry.name!r} is registered by both {existing.plugin!r} and {entry.plugin!r}; "
                f"disable one (FLUXTUNE_DISABLE_PLUGINS) or register with replace=True"
            )
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


def build_registry(pm: pluggy.PluginManager) -> Registry:
    registry = Registry()
    for kind, hook_name in KINDS.items():
        # Call each implementation on its own, built-ins first, so every entry knows its plugin.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            def register(name: str, factory: Callable[[Any], Any], params: type[BaseModel] = Params,
                         doc: str = "", replace: bool = False, _plugin: str = impl.plugin_name, _kind: str = kind):
                registry.add(Entry(_kind, name, factory, params, doc, _plugin), replace=replace)

            impl.function(register=register)
    return registry


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, built from the process-wide plugin manager."""
    from fluxtune.plugins import plugin_manager

    return build_registry(plugin_manager()[0])
