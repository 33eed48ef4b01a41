"""`--set key.path=value` overrides, applied to the parsed YAML before validation.

Paths address the file (`base.stages.lora.steps=10`, `search.num_samples=2`); list items are addressed by
their `name` (stages) or index, and a dotted key such as a search-space path is matched whole
(`search.space.stages.lora.adapter.rank.choices=[4,8]`; a new search-space key is everything after
`search.space.`). Values are YAML (`[4, 8]`, `true`, `1e-4`), read with the same limits as a file.
Every problem names the `--set` it came from; a key the file lacks is created, so validation reports it there.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml.comments import CommentedMap

from fluxtune.config.errors import InputError, Problem
from fluxtune.config.paths import PathError, locate
from fluxtune.config.yaml_source import YamlSource, parse_yaml, plain

MAX_OVERRIDE = 10_000  # characters of one --set; a value is a number, a name or a short list
_SEARCH_SPACE = ("search", "space")  # its keys are dotted paths themselves


def _parse_value(text: str, flag: str) -> Any:
    if len(text) > MAX_OVERRIDE:
        raise InputError([Problem(flag[:80] + "…", f"longer than {MAX_OVERRIDE:,} characters")])
    try:
        tree = parse_yaml(f"value: {text}", flag).tree
    except InputError as exc:
        raise InputError([Problem(flag, f"the value is not valid YAML: {exc.problems[0].message}")]) from None
    if not isinstance(tree, dict) or list(tree) != ["value"]:  # e.g. a newline and `b: 2` in the value
        raise InputError([Problem(flag, "the value is not one YAML value")])
    return plain(tree["value"])


def _top_level_problem(path: str, flag: str) -> Problem | None:
    """A path whose first key is not a key of a search file (`--set data.jsonl=…` meant `base.data.jsonl`)."""
    from fluxtune.config.schema import Experiment, SearchFile

    first = path.split(".")[0]
    if first in SearchFile.model_fields:
        return None
    hint = f"; did you mean base.{path}?" if first in Experiment.model_fields else ""
    keys = ", ".join(SearchFile.model_fields)
    return Problem(flag, f"{first!r} is not a top-level key of the file ({keys}){hint}")


def apply_overrides(source: YamlSource, overrides: list[str] | tuple[str, ...]) -> YamlSource:
    """The source with every override written into its tree; problems name the `--set` they came from."""
    problems: list[Problem] = []
    if not isinstance(source.tree, dict) and overrides:
        raise InputError([Problem(f"--set {overrides[0]}", "the file is not a mapping: nothing to set")])
    for text in overrides:
        flag = f"--set {text}"
        path, sep, raw = text.partition("=")
        path = path.strip()
        parts = path.split(".")
        if not sep or not path or any(not part.strip() for part in parts):
            problems.append(Problem(flag, "expected KEY.PATH=VALUE"))
            continue
        top = _top_level_problem(path, flag)
        if top is not None:
            problems.append(top)
            continue
        try:
            value = _parse_value(raw, flag)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        try:  # the walk adds the mappings the file lacks, so validation reports the new keys there
            spot = locate(source.tree, path, make=CommentedMap, whole_rest_at=_SEARCH_SPACE)
        except PathError as exc:
            problems.append(Problem(flag, f"cannot set {path}: {exc.reason}"))
            continue
        spot.parent[spot.key] = value
        source.overrides[spot.loc] = flag
        if spot.created is not None:  # a problem at a key the file lacked is this flag's, not the file's
            source.overrides[spot.created] = flag
    if problems:
        raise InputError(problems)
    return source


__all__ = ["apply_overrides"]
