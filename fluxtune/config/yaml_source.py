"""YAML loading that keeps line/column positions, so errors can point into the file (safe loader only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from fluxtune.config.errors import InputError, Problem


@dataclass
class YamlSource:
    path: str
    text: str
    tree: Any  # ruamel round-trip nodes (CommentedMap/Seq) carrying .lc positions
    overrides: dict[tuple[Any, ...], str] = field(default_factory=dict)  # location → "--set a.b=1"

    def override_for(self, loc: tuple[Any, ...]) -> str | None:
        """The `--set` that wrote the value at `loc` (or above it), if any."""
        for where, text in self.overrides.items():
            if loc[:len(where)] == where:
                return text
        return None

    def data(self) -> Any:
        """The document as plain dicts/lists/scalars."""
        return _plain(self.tree)

    def position(self, loc: tuple[Any, ...]) -> tuple[int | None, int | None]:
        """1-based (line, col) of the deepest node of `loc` that exists in the file."""
        node, line, col = self.tree, None, None
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                line, col = node.lc.key(part)
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                line, col = node.lc.item(part) or (line, col)  # flow items of some nodes carry no position
                node = node[part]
            else:
                break
        if line is None:
            return None, None
        return line + 1, col + 1

    def snippet(self, line: int | None) -> str:
        if line is None:
            return ""
        lines = self.text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else ""


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_yaml(path: str | Path) -> YamlSource:
    """Parse a YAML file; a missing file or a syntax error is an `InputError` at file:line:col."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError.single(path, "file not found") from None
    except OSError as exc:
        raise InputError.single(path, f"cannot read: {exc.strerror}") from None
    return parse_yaml(text, path)


_CORE = "tag:yaml.org,2002:"
# What plain YAML resolves to by itself; an explicit tag (`!!python/object:…`, `!custom`) is refused instead of
# being carried along as a tagged value (the round-trip loader never constructs it, but it is never meant either).
PLAIN_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")}


def _tag_problems(yaml: YAML, text: str, path: str) -> list[Problem]:
    problems, seen, todo = [], set(), [yaml.compose(text)]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:  # an alias points at a node already walked
            continue
        seen.add(id(node))
        tag = str(node.tag)
        if tag not in PLAIN_TAGS:
            shown = "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag
            problems.append(Problem(path, f"YAML tag {shown!r} is not allowed: fluxtune reads plain YAML only",
                                    line=node.start_mark.line + 1, col=node.start_mark.column + 1,
                                    snippet=text.splitlines()[node.start_mark.line]))
        if isinstance(node.value, list):
            for item in node.value:
                todo.extend(item if isinstance(item, tuple) else (item,))
    return sorted(problems, key=lambda p: (p.line, p.col))


def parse_yaml(text: str, path: str = "<string>") -> YamlSource:
    yaml = YAML(typ="rt")  # round-trip keeps positions; it builds no arbitrary Python objects
    try:
        problems = _tag_problems(yaml, text, path)
        if problems:
            raise InputError(problems)
        tree = yaml.load(text)
    except InputError:
        raise
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        message = f"YAML syntax error: {exc.problem or exc.context}"
        raise InputError([Problem(file=path, message=message, line=line, col=col)]) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (duplicate keys, bad tags)
        raise InputError.single(path, f"YAML error: {exc}".splitlines()[0]) from None
    if tree is None:
        tree = CommentedMap()
    return YamlSource(path=path, text=text, tree=tree)
