"""YAML loading that keeps line/column positions, so errors can point into the file (safe loader only)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.reader import ReaderError

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
        return plain(self.tree)

    def position(self, loc: tuple[Any, ...]) -> tuple[int | None, int | None]:
        """1-based (line, col) of the deepest node of `loc` that exists in the file."""
        node, line, col = self.tree, None, None
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                try:
                    line, col = node.lc.key(part)
                except KeyError:  # written by a `--set`: it has no place in the file, its parent does
                    break
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


def plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


MAX_BYTES = 1 << 20  # a search file is a few KiB; anything this big is not one (or is a YAML bomb)
MAX_NODES = 100_000  # values after alias expansion: a billion-laughs file is refused before it expands
MAX_DEPTH = 64  # nesting; a spec needs about 8


def load_yaml(path: str | Path) -> YamlSource:
    """Parse a YAML file; a missing, unreadable, oversized, binary or non-UTF-8 file or a syntax error is an
    `InputError` at file[:line:col]."""
    path = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError.single(path, "not a regular file")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise InputError.single(path, "file not found") from None
    except OSError as exc:
        raise InputError.single(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise InputError.single(path, f"larger than {MAX_BYTES >> 10} KiB: not a search file")
    return parse_yaml(decode_text(raw, path), path)


def decode_text(raw: bytes, path: str) -> str:
    """UTF-8 text (a BOM is allowed); a binary file or another encoding is refused at its first bad byte."""
    if b"\0" in raw:
        raise InputError.single(path, "binary file (it contains NUL bytes): not a YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError([Problem(path, f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded "
                                        "(save the file as UTF-8)", line=line, col=col)]) from None


_CORE = "tag:yaml.org,2002:"
# What plain YAML resolves to by itself; an explicit tag (`!!python/object:…`, `!custom`) is refused instead of
# being carried along as a tagged value (the round-trip loader never constructs it, but it is never meant either).
PLAIN_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")}


def _node_problems(root: Any, text: str, path: str) -> list[Problem]:
    """Explicit tags, and documents that expand (aliases) or nest beyond the limits, found on the composed
    node graph before anything is constructed."""
    problems, sizes, depths = [], {}, {}
    lines = text.splitlines()

    def at(node: Any, message: str) -> Problem:
        mark = node.start_mark
        return Problem(path, message, line=mark.line + 1, col=mark.column + 1,
                       snippet=lines[mark.line] if mark.line < len(lines) else "")

    # Iterative post-order walk; an alias is a node reached twice, so its expansion is counted, not walked.
    todo: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    on_path: set[int] = set()
    while todo:
        node, children_done = todo.pop()
        key = id(node)
        children = [c for item in node.value for c in (item if isinstance(item, tuple) else (item,))] \
            if isinstance(node.value, list) else []
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            depths[key] = 1 + max((depths.get(id(c), 1) for c in children), default=0)
            if sizes[key] > MAX_NODES:
                return [at(node, f"the document expands to more than {MAX_NODES:,} values (YAML aliases): "
                                 "not a search file")]
            if depths[key] > MAX_DEPTH:
                return [at(node, f"nested more than {MAX_DEPTH} levels deep: not a search file")]
            continue
        if key in sizes or key in on_path:
            continue  # an alias of a node already counted (or of one of its own parents: a recursive alias)
        on_path.add(key)
        tag = str(node.tag)
        if tag not in PLAIN_TAGS:
            shown = "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag
            problems.append(at(node, f"YAML tag {shown!r} is not allowed: fluxtune reads plain YAML only"))
        todo.append((node, True))
        todo.extend((c, False) for c in children if id(c) not in sizes)
    return sorted(problems, key=lambda p: (p.line, p.col))


def _marked(exc: MarkedYAMLError, path: str) -> InputError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    col = mark.column + 1 if mark else None
    return InputError([Problem(file=path, message=f"YAML syntax error: {exc.problem or exc.context}",
                               line=line, col=col)])


def _deep_flow_nesting(text: str, path: str) -> InputError | None:
    """Brackets ([ {) nested beyond MAX_DEPTH, found by one pass over the text before parsing: ruamel recurses
    once per level and spends seconds on a few thousand levels before Python's recursion limit stops it.
    Brackets in quoted scalars and comments are not counted; a plain scalar's apostrophe may hide the rest of its
    line from this pass, never add brackets (ruamel's own limit still holds)."""
    depth, line, col, quote, comment, previous = 0, 1, 0, "", False, "\n"
    for char in text:
        col += 1
        if char == "\n":
            line, col, comment, quote = line + 1, 0, False, ""  # a misread apostrophe hides one line at most
        elif comment:
            pass
        elif quote:
            if char == quote and not (quote == '"' and previous == "\\"):
                quote = ""
        elif char == "#" and previous in " \t\n":
            comment = True
        elif char in "'\"" and previous in " \t\n[{,:":
            quote = char
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return InputError([Problem(path, f"nested more than {MAX_DEPTH} levels deep: not a search file",
                                           line=line, col=col)])
        elif char in "]}":
            depth = max(0, depth - 1)
        previous = char
    return None


def parse_yaml(text: str, path: str = "<string>") -> YamlSource:
    yaml = YAML(typ="rt")  # round-trip keeps positions; it builds no arbitrary Python objects
    deep = _deep_flow_nesting(text, path)
    if deep is not None:
        raise deep
    try:
        root = yaml.compose(text)
        problems = _node_problems(root, text, path)
        if problems:
            raise InputError(problems)
        # built from the checked nodes, not parsed a second time (positions and comments are the nodes')
        tree = None if root is None else yaml.constructor.construct_document(root)
    except InputError:
        raise
    except MarkedYAMLError as exc:
        raise _marked(exc, path) from None
    except ReaderError as exc:  # a control character: its position is a character offset
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise InputError([Problem(path, f"character {exc.character!r} is not allowed in YAML", line=line,
                                  col=col)]) from None
    except RecursionError:
        raise InputError.single(path, f"nested more than {MAX_DEPTH} levels deep: not a search file") from None
    except Exception as exc:  # ruamel raises a few unmarked errors (duplicate keys, bad tags)
        raise InputError.single(path, f"YAML error: {exc}".splitlines()[0][:300]) from None
    if tree is None:
        tree = CommentedMap()
    return YamlSource(path=path, text=text, tree=tree)
