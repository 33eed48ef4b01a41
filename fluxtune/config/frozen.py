"""Read-only config trees. A resolved experiment is shared by everything that asks about its trial (the sweep's
callbacks, retention, rows), so a change made by one would be seen by all: nothing may change it in place.

They stay `dict` and `list` (every reader of an experiment tests for those), pickle as themselves, and copy
(`copy.deepcopy`, `thaw`) into plain, changeable ones.
"""

from __future__ import annotations

from typing import Any, NoReturn


def _refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError("a resolved config is read-only: change a copy of it (fluxtune.config.frozen.thaw)")


class FrozenDict(dict):
    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenDict, (dict(self),)

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return thaw(self)


class FrozenList(list):
    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenList, (list(self),)

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return thaw(self)


def freeze(tree: Any) -> Any:
    """`tree` with every mapping and list read-only (the leaves are numbers, strings and None)."""
    if isinstance(tree, (FrozenDict, FrozenList)):  # read-only all the way down already
        return tree
    if isinstance(tree, dict):
        return FrozenDict((key, freeze(value)) for key, value in tree.items())
    if isinstance(tree, list):
        return FrozenList(freeze(value) for value in tree)
    return tree


def thaw(tree: Any) -> Any:
    """A plain, changeable copy of `tree` (for a YAML writer, or code that edits its own copy)."""
    if isinstance(tree, dict):
        return {key: thaw(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [thaw(value) for value in tree]
    return tree


__all__ = ["FrozenDict", "FrozenList", "freeze", "thaw"]
