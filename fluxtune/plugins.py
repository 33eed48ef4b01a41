"""The plugin manager: built-ins first, then installed entry points of the group `fluxtune`.

`FLUXTUNE_LOAD_PLUGINS=a,b` loads only those installed plugins (empty: none); `FLUXTUNE_DISABLE_PLUGINS=a,b`
skips those. Names are entry-point names; built-ins always load. A Ray worker ignores both and loads exactly
the set its driver resolved (`use_plugin_set`).
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy

from fluxtune import hookspecs
from fluxtune.config.errors import InputError, Problem

GROUP = "fluxtune"
DEFAULT_PLUGINS = (
    "fluxtune.default_plugins.stages",
    "fluxtune.default_plugins.adapters",
    "fluxtune.default_plugins.losses",
    "fluxtune.default_plugins.timesteps",
    "fluxtune.default_plugins.callbacks",
    "fluxtune.default_plugins.optimizers",
)
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith(("register_", "validate_")))


@dataclass(frozen=True)
class PluginInfo:
    name: str  # entry-point name, or module name for built-ins
    distribution: str
    version: str
    builtin: bool
    source: str = ""  # what was loaded: "package.module" (entry-point value) or the module name

    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


class PluginSetMismatch(RuntimeError):
    """This process cannot load the plugin set its driver resolved (missing plugin, other version)."""


_pinned: frozenset[str] | None = None  # set in Ray workers by use_plugin_set


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _selection() -> tuple[set[str] | None, set[str], bool]:
    """(only these, not these, from the environment?)"""
    if _pinned is not None:
        return set(_pinned), set(), False
    return _env_names("FLUXTUNE_LOAD_PLUGINS"), _env_names("FLUXTUNE_DISABLE_PLUGINS") or set(), True


def _plugin_problem(name: str, where: str, message: str) -> Problem:
    return Problem(file=f"plugin {name!r}{where}", message=f"{message}; disable it with FLUXTUNE_DISABLE_PLUGINS={name}")


def _unknown_names_problems(only: set[str] | None, disabled: set[str], installed: set[str]) -> list[Problem]:
    problems = []
    for var, names in (("FLUXTUNE_LOAD_PLUGINS", only or set()), ("FLUXTUNE_DISABLE_PLUGINS", disabled)):
        for name in sorted(names - installed):
            close = difflib.get_close_matches(name, sorted(installed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem(file=var, message=f"no installed plugin is named {name!r} "
                                    f"(installed: {', '.join(sorted(installed)) or 'none'}){hint}"))
    return problems


def misspelt_hooks(pm: pluggy.PluginManager, infos: dict[str, PluginInfo] | None = None) -> list[Problem]:
    """Every hook implementation whose name is not a fluxtune hook (pluggy would only name the first)."""
    problems = []
    for hook_name, caller in sorted(vars(pm.hook).items()):
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        close = difflib.get_close_matches(hook_name, HOOK_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        for impl in caller.get_hookimpls():
            info = (infos or {}).get(impl.plugin_name)
            where = f" ({info.distribution} {info.version})" if info else ""
            if not impl.optionalhook:
                problems.append(_plugin_problem(impl.plugin_name, where, f"implements unknown hook {hook_name!r} "
                                                f"(fluxtune hooks: {', '.join(HOOK_NAMES)}){hint}"))
    return problems


def build_plugin_manager() -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """Load built-ins and the selected entry points; every broken plugin is named, all at once."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    from fluxtune import __version__

    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        infos[module_name] = PluginInfo(module_name, "fluxtune", __version__, builtin=True, source=module_name)

    only, disabled, from_env = _selection()
    entry_points = list(metadata.entry_points(group=GROUP))
    problems = _unknown_names_problems(only, disabled, {ep.name for ep in entry_points}) if from_env else []
    for ep in entry_points:
        if (only is not None and ep.name not in only) or ep.name in disabled or pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        where = f" ({dist} {version})"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must be named, not crash with a traceback
            problems.append(_plugin_problem(ep.name, where, f"failed to import {ep.value}: {type(exc).__name__}: {exc}"))
            continue
        try:
            pm.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:  # e.g. a hook with the wrong argument names
            problems.append(_plugin_problem(ep.name, where, str(exc)))
            continue
        infos[ep.name] = PluginInfo(ep.name, dist, version, builtin=False, source=ep.value)

    problems += misspelt_hooks(pm, infos)
    if problems:
        raise InputError(problems)
    return pm, infos


@lru_cache(maxsize=1)
def plugin_manager() -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """The process-wide plugin manager (built once)."""
    return build_plugin_manager()


_changes = 0  # how often the loaded plugin set changed: the component table (built from it) rebuilds on a new count


def changes() -> int:
    """A count that moves whenever the loaded plugins change (reset, add_plugin, remove_plugin)."""
    return _changes


def _changed() -> None:
    global _changes
    _changes += 1


def plugin_set() -> dict[str, str]:
    """name → 'distribution==version' of every loaded plugin: pinned by the driver, checked in workers."""
    _, infos = plugin_manager()
    return {name: info.pin() for name, info in infos.items()}


def reset() -> None:
    """Forget the process-wide plugin manager and components; the next use rebuilds both."""
    plugin_manager.cache_clear()
    _changed()


def use_plugin_set(expected: dict[str, str] | None) -> None:
    """Load exactly the plugins of `expected` (a driver's `plugin_set()`) in this process, or fail saying why.

    Called at the start of each Ray worker and trial: the environment variables of a remote node may differ,
    and a component resolved by the driver must mean the same code everywhere. `None` returns to the
    environment variables' rules.
    """
    global _pinned
    if expected is None:
        if _pinned is not None:
            _pinned = None
            reset()
        return
    wanted = frozenset(expected) - set(DEFAULT_PLUGINS)
    if _pinned != wanted:
        _pinned = wanted
        reset()
    found = plugin_set()
    if found == expected:
        return
    missing = [f"{n} ({v})" for n, v in sorted(expected.items()) if n not in found]
    different = [f"{n}: driver {v}, here {found[n]}" for n, v in sorted(expected.items()) if n in found and found[n] != v]
    extra = [f"{n} ({v})" for n, v in sorted(found.items()) if n not in expected]
    details = "; ".join(part for part in (
        f"missing {', '.join(missing)}" if missing else "",
        f"other versions {', '.join(different)}" if different else "",
        f"not loaded by the driver {', '.join(extra)}" if extra else "") if part)
    raise PluginSetMismatch(f"this process's plugins differ from the driver's: {details}; "
                            "install the same plugin versions on every node")


def add_plugin(plugin: Any, name: str, distribution: str = "<in-process>", version: str = "0") -> PluginInfo:
    """Register a plugin object in the process-wide manager (tests, notebooks); the component table is rebuilt."""
    pm, infos = plugin_manager()
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise InputError([_plugin_problem(name, "", str(exc))]) from exc
    problems = misspelt_hooks(pm)
    if problems:
        pm.unregister(name=name)
        raise InputError(problems)
    source = getattr(plugin, "__name__", None) or f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    infos[name] = info = PluginInfo(name, distribution, version, builtin=False, source=source)
    _changed()
    return info


def remove_plugin(name: str) -> None:
    pm, infos = plugin_manager()
    if pm.has_plugin(name):
        pm.unregister(name=name)
    infos.pop(name, None)
    _changed()


def command_names(pm: pluggy.PluginManager) -> dict[str, list[str]]:
    """plugin name → the CLI commands its `register_commands` adds (each called on a scratch Typer app)."""
    import typer

    out: dict[str, list[str]] = {}
    for impl in pm.hook.register_commands.get_hookimpls():
        scratch = typer.Typer()
        impl.function(cli=scratch)
        out[impl.plugin_name] = [c.name or (c.callback.__name__.replace("_", "-") if c.callback else "?")
                                 for c in scratch.registered_commands]
        out[impl.plugin_name] += [g.name or "?" for g in scratch.registered_groups]
    return out


@dataclass(frozen=True)
class ExperimentProblem:
    """One problem a plugin's `validate_experiment` found: `key` is a dotted experiment path, or ""."""

    plugin: str  # 'name' (distribution version), as the registry's provenance reads
    key: str
    message: str


def experiment_problems(experiment: dict[str, Any], model: dict[str, Any] | None) -> list[ExperimentProblem]:
    """Every problem the `validate_experiment` implementations report for this experiment, each naming its plugin;
    a hook that raises or answers in another shape is a problem of that plugin too."""
    pm, infos = plugin_manager()
    found = []
    for impl in pm.hook.validate_experiment.get_hookimpls():
        info = infos.get(impl.plugin_name)
        who = f"{impl.plugin_name!r} ({info.distribution} {info.version})" if info else repr(impl.plugin_name)
        arguments = {"experiment": experiment, "model": model}
        try:
            answer = impl.function(**{name: arguments[name] for name in impl.argnames})
        except Exception as exc:  # a plugin's bug: named, not shown as a traceback
            found.append(ExperimentProblem(who, "", f"validate_experiment failed: {type(exc).__name__}: {exc}; "
                                                    f"disable it with FLUXTUNE_DISABLE_PLUGINS={impl.plugin_name}"))
            continue
        for item in [answer] if isinstance(answer, str) else answer or []:
            if isinstance(item, str):
                found.append(ExperimentProblem(who, "", item))
            elif isinstance(item, tuple) and len(item) == 2 and all(isinstance(part, str) for part in item):
                found.append(ExperimentProblem(who, *item))
            else:
                found.append(ExperimentProblem(who, "", f"validate_experiment returned {item!r}: expected a message "
                                                        "or a (key, message) pair"))
    return found
