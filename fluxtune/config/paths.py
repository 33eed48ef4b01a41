"""Dotted paths into a config tree, read by one walker: `stages.lora.adapter.rank` in an experiment,
`base.stages.lora.steps` or `search.space.stages.lora.adapter.rank.choices` in a search file (`--set`).

List items are addressed by their `name` (stages) or their index; a mapping's longest dotted key is matched first,
because search-space keys contain dots.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator


class PathError(KeyError):
    """`path` does not lead anywhere; `reason` says why, `loc` is how far it got (keys and indices)."""

    def __init__(self, path: str, reason: str, loc: tuple[Any, ...] = ()):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.loc = path, reason, loc

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Spot:
    """Where a path ends: its value is `parent[key]` (or will be, when `exists` is False)."""

    parent: Any  # the mapping or list holding it
    key: Any  # a mapping key, or a list index
    loc: tuple[Any, ...]  # keys and indices from the root, `key` last
    exists: bool
    created: tuple[Any, ...] | None = None  # the location of the first key the walk added, if it added any


def _child(node: Any, parts: list[str], loc: tuple[Any, ...], whole_rest_at: tuple[Any, ...] | None,
           path: str) -> tuple[Any, int, bool]:
    """(key or index in `node`, path parts it used, whether it is there) for the next parts of the path."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == parts[0]:
                return i, 1, True
        if parts[0].isdigit() and int(parts[0]) < len(node):
            return int(parts[0]), 1, True
        names = [str(item["name"]) for item in node if isinstance(item, dict) and "name" in item]
        what = "stage" if loc and loc[-1] == "stages" else "list item"
        listed = (f" ({'stages' if what == 'stage' else 'names'}: {', '.join(names)})" if names
                  else f" (indices 0-{len(node) - 1})" if node else "")
        raise PathError(path, f"no {what} named {parts[0]!r}{listed}", loc)
    for used in range(len(parts), 0, -1):  # the longest dotted key first
        key = ".".join(parts[:used])
        if key in node:
            return key, used, True
    if loc == whole_rest_at:  # a new dotted key: the whole rest of the path
        return ".".join(parts), len(parts), False
    return parts[0], 1, False


def locate(tree: Any, path: str, *, new_last: bool = False, make: Callable[[], Any] | None = None,
           whole_rest_at: tuple[Any, ...] | None = None) -> Spot:
    """Where `path` leads in `tree`. Every key must exist, except: the last one when `new_last`; any one when
    `make` is given, which then adds the missing mappings on the way (`tree` changes). At `whole_rest_at` a
    missing key is the whole rest of the path (a new search-space key)."""
    every_part = path.split(".")
    parts = every_part
    node, loc, created = tree, (), None
    while True:
        if not isinstance(node, (dict, list)):
            walked = ".".join(every_part[:len(every_part) - len(parts)])
            raise PathError(path, f"{walked or 'the root'} is a value, not a mapping", loc)
        key, used, exists = _child(node, parts, loc, whole_rest_at, path)
        parts = parts[used:]
        if not exists and make is None and (parts or not new_last):
            keys = ", ".join(sorted(map(str, node)))
            raise PathError(path, f"{key!r} does not exist here (keys: {keys})", loc)
        loc += (key,)
        if not exists and make is not None:
            created = created or loc
        if not parts:
            return Spot(node, key, loc, exists, created)
        if not exists:
            node[key] = make()
        node = node[key]


def get_path(tree: Any, path: str) -> Any:
    spot = locate(tree, path)
    return spot.parent[spot.key]


def set_path(tree: Any, path: str, value: Any, *, new_key: bool = False) -> Any:
    """A copy of `tree` with the value at `path` replaced; the path must exist (`new_key`: but for its last key,
    which is then added to its mapping)."""
    out = copy.deepcopy(tree)
    spot = locate(out, path, new_last=new_key)
    if isinstance(spot.parent, list) and isinstance(spot.parent[spot.key], dict):
        raise PathError(path, "cannot replace a whole stage", spot.loc)
    spot.parent[spot.key] = value  # in a list: one of its values, e.g. per-cycle steps of a schedule
    return out


def stage_loc(tree: Any, path: str) -> tuple[Any, ...]:
    """The schema location (`('stages', 1, 'adapter', 'rank')`) of a dotted path, for error positions: as far
    as the path exists in `tree`."""
    try:
        return locate(tree, path).loc
    except PathError as exc:
        return exc.loc


def corner_trees(tree: dict[str, Any], space: dict[str, Any], keys: list[str]) -> Iterator[dict[str, Any]]:
    """`tree` with every combination of the searched `keys`' extreme values (their distributions' corners)."""
    for combo in itertools.product(*(space[k].corners() for k in keys)):
        out = tree
        for key, value in zip(keys, combo):
            out = set_path(out, key, value)
        yield out
