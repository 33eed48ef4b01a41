"""The plugin manager: built-ins first, then installed entry points of the group `fluxtune`.

`FLUXTUNE_LOAD_PLUGINS=a,b` loads only those installed plugins (empty: none); `FLUXTUNE_DISABLE_PLUGINS=a,b`
skips those. Names are entry-point names. Built-ins always load.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

import pluggy

from fluxtune import hookspecs
from fluxtune.config.errors import InputError, Problem

GROUP = "fluxtune"
DEFAULT_PLUGINS = (
    "fluxtune.default_plugins.stages",
    "fluxtune.default_plugins.adapters",
    "fluxtune.default_plugins.losses",
    "fluxtune.default_plugins.timesteps",
)


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name, or module name for built-ins
    distribution: str
    version: str
    builtin: bool


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _wanted(name: str) -> bool:
    only = _env_names("FLUXTUNE_LOAD_PLUGINS")
    disabled = _env_names("FLUXTUNE_DISABLE_PLUGINS") or set()
    return (only is None or name in only) and name not in disabled


def build_plugin_manager() -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    from fluxtune import __version__

    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        infos[module_name] = PluginInfo(module_name, "fluxtune", __version__, builtin=True)

    for ep in metadata.entry_points(group=GROUP):
        if not _wanted(ep.name) or pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must be named, not crash with a traceback
            raise InputError([Problem(
                file=f"plugin {ep.name!r} ({dist} {version})",
                message=f"failed to import {ep.value}: {type(exc).__name__}: {exc}; "
                f"disable it with FLUXTUNE_DISABLE_PLUGINS={ep.name}",
            )]) from exc
        pm.register(plugin, name=ep.name)
        infos[ep.name] = PluginInfo(ep.name, dist, version, builtin=False)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or "?"
        raise InputError([Problem(
            file=f"plugin {name!r}", message=f"{exc}; disable it with FLUXTUNE_DISABLE_PLUGINS={name}",
        )]) from exc
    return pm, infos


@lru_cache(maxsize=1)
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """The process-wide plugin manager (built once)."""
    return build_plugin_manager()


def plugin_set() -> dict[str, str]:
    """name → 'distribution==version' of every loaded plugin: pinned by the driver, checked in workers."""
    _, infos = plugin_manager()
    return {name: f"{i.distribution}=={i.version}" for name, i in infos.items()}
