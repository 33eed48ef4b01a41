"""Everything checked before Ray starts: the spec, the model folder, the data file and its rows, the validation
split, and the plugins' own checks of the experiment against the model (`validate_experiment`: the built-in
LoRA adapter's target names among them)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from fluxtune import storage
from fluxtune.config.errors import InputError, Problem
from fluxtune.config.load import load_search_file, located_problem
from fluxtune.config.overrides import apply_overrides
from fluxtune.config.paths import stage_loc
from fluxtune.config.schema import SearchFile
from fluxtune.config.yaml_source import load_yaml


@dataclass
class Checked:
    spec: SearchFile
    base: dict[str, Any]
    jsonl: str
    rows: int
    skipped: list[str] = field(default_factory=list)  # problems of the rows `on_bad_rows: skip` dropped


class _Located:
    """Problems at positions of the spec file (or the `--set` that wrote the value)."""

    def __init__(self, spec_path: str, overrides: list[str] | tuple[str, ...] = ()):
        self.path = spec_path
        self.overrides = overrides

    @functools.cached_property
    def source(self):
        """The spec with its positions, parsed again only when a problem needs one (a good spec never)."""
        return apply_overrides(load_yaml(self.path), self.overrides)

    def error(self, loc: tuple[Any, ...], message: str) -> InputError:
        return InputError([self.problem(loc, message)])

    def problem(self, loc: tuple[Any, ...], message: str) -> Problem:
        return located_problem(self.source, loc, message)


def _data_problem(spec_path: str, key: str, message: str) -> InputError:
    return _Located(spec_path).error(tuple(key.split(".")), message)


def check_spec_files(spec_path: str, overrides: list[str] | tuple[str, ...], spec: SearchFile,
                     base: dict[str, Any]) -> None:
    """`check_input_files` for a spec already loaded (what `validate` and `--dry-run` add to validation)."""
    check_input_files(spec, base, _Located(spec_path, overrides))


def resolve_jsonl(spec_path: str, data: dict[str, Any], seed: int) -> str:
    if data["jsonl"] == "sample":
        from fluxtune.data.sample import ensure_sample_dataset

        return str(ensure_sample_dataset(n=data["sample_size"], resolution=max(data["resolution"], 32), seed=seed))
    path = data["jsonl"]
    return path if storage.is_uri(path) else os.path.abspath(path)


def _missing_file(path: Any) -> str | None:
    """Why a local data file cannot be read (None: it can, or it is a URI, checked when it is read)."""
    if not isinstance(path, str) or storage.is_uri(path) and not path.startswith("file://"):
        return None
    local = path.removeprefix("file://")
    if not os.path.exists(local):
        return "does not exist"
    if not os.path.isfile(local):
        return "is not a file"
    return None


def check_input_files(spec: SearchFile, base: dict[str, Any], where: _Located) -> None:
    """The files a spec names exist: data.jsonl and val_jsonl (also searched choices), and model folders are
    FLUX.1-Fill (JSON configs only). Cheap and import-light: `validate` and `--dry-run` run it too."""
    problems = []
    data = base["data"]
    for key in ("jsonl", "val_jsonl"):
        path = data.get(key)
        why = None if path in (None, "sample") else _missing_file(path)
        if why:
            problems.append(where.problem(("base", "data", key), f"data file {path!r} {why}"))
        searched = spec.search.space.get(f"data.{key}") if spec.search else None
        for choice in getattr(searched, "choices", None) or []:
            why = None if choice in (None, "sample") else _missing_file(choice)
            if why:
                problems.append(where.problem(("search", "space", f"data.{key}"), f"data file {choice!r} {why}"))
    try:
        check_model_folders(spec, base, where)
    except InputError as exc:
        problems += exc.problems
    else:
        problems += plugin_problems(spec, base, where)
    if problems:
        raise InputError(problems)


def check_model_folders(spec: SearchFile, base: dict[str, Any], where: _Located) -> None:
    """`model.path` (and searched model paths) must be FLUX.1-Fill folders: read from their configs, no weights."""
    from fluxtune.flux.layout import fill_transformer_config

    problems = []
    if base["model"].get("path"):
        try:
            fill_transformer_config(base["model"]["path"])
        except ValueError as exc:
            problems.append(where.problem(("base", "model", "path"), str(exc)))
    searched = spec.search.space.get("model.path") if spec.search else None
    for choice in getattr(searched, "choices", None) or []:
        try:
            fill_transformer_config(str(choice))
        except ValueError as exc:
            problems.append(where.problem(("search", "space", "model.path"), str(exc)))
    if problems:
        raise InputError(problems)


def _model_config(model: dict[str, Any]) -> dict[str, Any] | None:
    """The transformer config of an experiment's model (JSON only); None for a registered version alone."""
    from fluxtune.flux import presets
    from fluxtune.flux.layout import fill_transformer_config

    if model.get("preset"):
        return dict(presets.preset(model["preset"]).transformer)
    return fill_transformer_config(model["path"]) if model.get("path") else None


def _corner_experiments(spec: SearchFile, base: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(searched path, value, experiment) for each corner value of each searched key (validation has sampled
    each already, so these are valid)."""
    from fluxtune.components import loaded_components
    from fluxtune.config.resolved import resolve_trial

    for path, dist in (spec.search.space.items() if spec.search else ()):
        for value in dist.corners():
            yield path, value, resolve_trial(base, {path: value}, loaded_components()).experiment


def plugin_problems(spec: SearchFile, base: dict[str, Any], where: _Located) -> list[Problem]:
    """What the plugins' `validate_experiment` hooks find in the base experiment and the searched corners, each
    problem at its key's line (or at the searched key) and naming its plugin."""
    from fluxtune.plugins import experiment_problems

    problems, said = [], set()
    for searched, value, experiment in [("", None, base), *_corner_experiments(spec, base)]:
        for found in experiment_problems(experiment, _model_config(experiment["model"])):
            if (found.plugin, found.key, found.message) in said:  # the base's problem, again in a corner
                continue
            said.add((found.plugin, found.key, found.message))
            text = f"{found.message} (plugin {found.plugin})"
            if searched:
                problems.append(where.problem(("search", "space", searched), f"value {value!r}: {text}"))
            elif found.key:
                problems.append(where.problem(("base", *stage_loc(base, found.key)), text))
            else:
                problems.append(Problem(where.path, text))
    return problems


def check_outputs(spec_path: str, spec: SearchFile) -> None:
    """Where results go must take them: the storage folder is writable and a tracking server answers (the
    storage and MLflow faults). Writes nothing."""
    from fluxtune.checkpoints import check_writable_folder
    from fluxtune.tracking.store import server_uri, unreachable

    folder = spec.storage_path or "runs"
    if storage.is_uri(folder):  # a bucket that is missing or refuses us: said now, not after the data is encoded
        why = storage.check_writable(folder)
        if why:
            raise _data_problem(spec_path, "storage_path", f"cannot write checkpoints to {folder}: {why}")
    else:
        why = check_writable_folder(folder)
        if why:
            default = "" if spec.storage_path else " (the default)"
            raise _data_problem(spec_path, "storage_path",
                                f"cannot write checkpoints to {os.path.abspath(folder)}{default}: {why}")
    uri = server_uri(spec.tracking.uri)
    why = unreachable(uri) if uri else None
    if why:
        raise _data_problem(spec_path, "tracking.uri", f"MLflow tracking server {uri} is unreachable ({why}): "
                                                       "start it with `fluxtune ui` or fix tracking.uri")


def preflight(spec_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Checked:
    """Spec, model, data files and every row, checked before Ray starts; bad rows fail here unless skipped."""
    from fluxtune.data.selection import select_rows

    spec, base = load_search_file(spec_path, overrides=overrides)
    where = _Located(spec_path, overrides)
    check_input_files(spec, base, where)  # cheap (JSON only): before the rows are decoded
    data = base["data"]
    jsonl = resolve_jsonl(spec_path, data, base["seed"])
    selection = select_rows(jsonl, data)
    n_val = selection.validation_count(data["val_fraction"], base["seed"])
    if not data["val_jsonl"] and (n_val == 0 or n_val == len(selection.rows)):
        rows = len(selection.rows)
        raise where.error(("base", "data", "val_fraction"),
                          f"val_fraction {data['val_fraction']} splits {rows} rows into {rows - n_val} "
                          f"training and {n_val} validation rows; both need at least one")
    check_outputs(spec_path, spec)  # last: every input problem first, and nothing is written before it
    return Checked(spec=spec, base=base, jsonl=jsonl, rows=len(selection.rows), skipped=selection.skipped)
