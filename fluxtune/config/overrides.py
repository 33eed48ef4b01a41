"""`--set key.path=value` overrides, applied to the parsed YAML before validation.

Paths address the file (`base.stages.lora.steps=10`, `search.num_samples=2`); list items are addressed by
their `name` (stages) or index, and a dotted key such as a search-space path is matched whole
(`search.space.stages.lora.adapter.rank.choices=[4,8]`). Values are YAML (`[4, 8]`, `true`, `1e-4`).
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from fluxtune.config.errors import InputError, Problem
from fluxtune.config.yaml_source import YamlSource


def _parse_value(text: str, flag: str) -> Any:
    try:
        return YAML(typ="safe", pure=True).load(text)
    except Exception as exc:
        raise InputError([Problem(flag, f"the value is not valid YAML: {str(exc).splitlines()[0]}")]) from None


def _child(node: Any, parts: list[str]) -> tuple[Any, int]:
    """The key/index in `node` that the next path parts name, and how many parts it used."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == parts[0]:
                return i, 1
        if parts[0].isdigit() and int(parts[0]) < len(node):
            return int(parts[0]), 1
        raise KeyError(f"no list item named {parts[0]!r}")
    for used in range(len(parts), 0, -1):  # the longest dotted key first: search-space keys contain dots
        key = ".".join(parts[:used])
        if key in node:
            return key, used
    return parts[0], 1


def apply_overrides(source: YamlSource, overrides: list[str] | tuple[str, ...]) -> YamlSource:
    """The source with every override written into its tree; problems name the `--set` they came from."""
    problems: list[Problem] = []
    for text in overrides:
        flag = f"--set {text}"
        path, sep, raw = text.partition("=")
        if not sep or not path.strip():
            problems.append(Problem(flag, "expected KEY.PATH=VALUE"))
            continue
        try:
            value = _parse_value(raw, flag)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        parts, node, loc = path.strip().split("."), source.tree, []
        try:
            while True:
                key, used = _child(node, parts)
                loc.append(key)
                parts = parts[used:]
                if not parts:
                    break
                if isinstance(node, dict) and key not in node:
                    node[key] = CommentedMap()
                node = node[key]
                if not isinstance(node, (dict, list)):
                    raise KeyError(f"{'.'.join(map(str, loc))} is a value, not a mapping")
        except KeyError as exc:
            problems.append(Problem(flag, f"cannot set {path.strip()}: {exc.args[0]}"))
            continue
        node[key] = value
        source.overrides[tuple(loc)] = flag
    if problems:
        raise InputError(problems)
    return source


__all__ = ["apply_overrides"]
