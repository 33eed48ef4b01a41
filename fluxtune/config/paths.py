"""Dotted paths into an experiment dict (`stages.lora.adapter.rank`): stages are addressed by name."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterator


class PathError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _step(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):  # the stage list: address by stage name (or index)
        for item in node:
            if isinstance(item, dict) and item.get("name") == part:
                return item
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        names = [i.get("name") for i in node if isinstance(i, dict)]
        raise PathError(f"{path}: no stage named {part!r} (stages: {', '.join(map(str, names))})")
    if isinstance(node, dict) and part in node:
        return node[part]
    keys = ", ".join(sorted(node)) if isinstance(node, dict) else type(node).__name__
    raise PathError(f"{path}: {part!r} does not exist here (keys: {keys})")


def get_path(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = _step(node, part, path)
    return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with the value at `path` replaced; the path must already exist."""
    out = copy.deepcopy(tree)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = _step(node, part, path)
    current = _step(node, last, path)  # existence check with a helpful message
    if isinstance(node, list):
        if isinstance(current, dict):
            raise PathError(f"{path}: cannot replace a whole stage")
        node[int(last)] = value  # a list of values, e.g. per-cycle steps of a schedule
        return out
    node[last] = value
    return out


def stage_loc(tree: dict[str, Any], path: str) -> tuple[Any, ...]:
    """The schema location (`('stages', 1, 'adapter', 'rank')`) of a dotted path, for error positions."""
    loc: list[Any] = []
    node: Any = tree
    for part in path.split("."):
        if isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, dict) and item.get("name") == part:
                    loc.append(i)
                    node = item
                    break
            else:
                return tuple(loc)
        elif isinstance(node, dict) and part in node:
            loc.append(part)
            node = node[part]
        else:
            return tuple(loc)
    return tuple(loc)


def corner_trees(tree: dict[str, Any], space: dict[str, Any], keys: list[str]) -> Iterator[dict[str, Any]]:
    """`tree` with every combination of the searched `keys`' extreme values (their distributions' corners)."""
    for combo in itertools.product(*(space[k].corners() for k in keys)):
        out = tree
        for key, value in zip(keys, combo):
            out = set_path(out, key, value)
        yield out
