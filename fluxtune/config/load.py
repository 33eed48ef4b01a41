"""Load and validate search files: schema, registered components, search paths — every problem at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fluxtune.api import ComponentSpec
from fluxtune.components import Components, UnknownComponent
from fluxtune.config.errors import InputError, Problem
from fluxtune.config.overrides import apply_overrides
from fluxtune.config.paths import PathError, get_path, locate, set_path, stage_loc
from fluxtune.config.schedule import schedule_problems
from fluxtune.config.schema import ALIAS, NAME, STAGE_NAME, Experiment, SearchFile
from fluxtune.config.yaml_source import YamlSource, load_yaml, parse_yaml

_DIST_TAGS = {"float", "int", "categorical"}
_PATTERN_MESSAGES = {
    NAME: "must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit (it becomes a folder "
          "and an MLflow name)",
    STAGE_NAME: "must be 1-64 letters, digits, '_' or '-', starting with a letter or digit (it is one part of "
                "search paths such as stages.NAME.steps)",
    ALIAS: "must be 1-100 letters, digits, '_' or '-' (an MLflow alias)",
}
TOP_LEVEL_KEYS = tuple(SearchFile.model_fields)
INT_LIMIT = 2**63  # every count, seed and size fits a signed 64-bit integer; beyond it numpy and Optuna overflow
PROBE_METRICS = ("masked_psnr", "masked_ssim")  # reported only by evaluations that run the validation preview
# What every evaluation of every stage reports (fluxtune.context.evaluate): the only metrics a search can rank
# trials on and a scheduler can compare at eval points; stage-end numbers of plugins are not reported there.
EVALUATION_METRICS = ("val_loss", *PROBE_METRICS)


def _key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Collector:
    def __init__(self, source: YamlSource):
        self.source = source
        self.problems: list[Problem] = []
        self.seen: set[tuple[Any, ...]] = set()
        self.cuda_only: list[tuple[tuple[Any, ...], str]] = []  # components whose params say requires_cuda

    def add(self, loc: tuple[Any, ...], message: str) -> None:
        self.seen.add(loc)
        overridden = self.source.override_for(loc)
        if overridden is not None:  # the value came from the command line, not the file
            self.problems.append(Problem(overridden, message, _key(loc)))
            return
        line, col = self.source.position(loc)
        self.problems.append(Problem(self.source.path, message, _key(loc), line, col, self.source.snippet(line)))

    def add_validation(self, prefix: tuple[Any, ...], error: ValidationError) -> None:
        earlier = set(self.seen)  # a non-finite number or a secret in a name, found before the schema ran
        for err in error.errors():
            loc = tuple(err["loc"])
            # pydantic puts the union tag into the location of a discriminated union member: drop it.
            loc = tuple(p for i, p in enumerate(loc) if not (p in _DIST_TAGS and i > 0 and loc[:2] == ("search", "space")))
            where = prefix + loc
            if where in self.seen or (where and any(seen[:len(where)] == where for seen in earlier)):
                continue  # already said, at this key or inside it (`high: .inf`, not also "the range")
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif err["type"] == "missing":
                message = "required key is missing"
            elif err["type"] == "string_pattern_mismatch":
                message = _PATTERN_MESSAGES.get(err.get("ctx", {}).get("pattern"), message)
            self.add(prefix + loc, message)

    def raise_if_any(self) -> None:
        if self.problems:
            raise InputError(self.problems)


def located_problem(source: YamlSource, loc: tuple[Any, ...], message: str) -> Problem:
    """One problem at `loc` of the file (file:line:col and key), or naming the `--set` that wrote the value."""
    out = _Collector(source)
    out.add(loc, message)
    return out.problems[0]


def _check_components(model: BaseModel, loc: tuple[Any, ...], components: Components,
                      out: _Collector) -> dict[str, Any]:
    """Validate nested ComponentSpecs against the component table; return the model as a dict with defaults filled."""
    values: dict[str, Any] = {}
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        values[field_name] = _normalise(value, loc + (field_name,), components, out)
    if model.model_extra:
        values.update(model.model_extra)
    return values


def _normalise(value: Any, loc: tuple[Any, ...], components: Components, out: _Collector) -> Any:
    if isinstance(value, ComponentSpec) and value.kind:
        try:
            entry = components.get(value.kind, value.type)
        except UnknownComponent as exc:
            out.add(loc + ("type",), str(exc))
            return value.model_dump()
        try:
            params = entry.params.model_validate(value.params())
        except ValidationError as exc:
            out.add_validation(loc, exc)
            return value.model_dump()
        if getattr(entry.params, "requires_cuda", False):
            out.cuda_only.append((loc + ("type",), f"{value.kind} {value.type!r}"))
        return {"type": value.type, **_check_components(params, loc, components, out)}
    if isinstance(value, BaseModel):
        return _check_components(value, loc, components, out)
    if isinstance(value, list):
        return [_normalise(v, loc + (i,), components, out) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _normalise(v, loc + (k,), components, out) for k, v in value.items()}
    return value


def normalise_experiment(exp: Experiment, components: Components, out: _Collector,
                         loc: tuple[Any, ...]) -> dict[str, Any]:
    """The experiment as a plain dict with every component's defaults filled in (what search paths address)."""
    out.cuda_only = []
    tree = _check_components(exp, loc, components, out)
    stages = []
    for i, stage in enumerate(exp.stages):
        stage_loc_ = loc + ("stages", i)
        try:
            entry = components.get("stage", stage.type)
        except UnknownComponent as exc:
            out.add(stage_loc_ + ("type",), str(exc))
            stages.append(stage.model_dump())
            continue
        try:
            params = entry.params.model_validate(stage.params())
        except ValidationError as exc:
            out.add_validation(stage_loc_, exc)
            stages.append(stage.model_dump())
            continue
        base = {"name": stage.name, "type": stage.type, "steps": stage.steps}
        stages.append({**base, **_check_components(params, stage_loc_, components, out)})
    tree["stages"] = stages
    for where, message in schedule_problems(tree):
        out.add(loc + where, message)
    if exp.gpus_per_worker == 0:
        for where, what in out.cuda_only:
            out.add(where, f"{what} runs on CUDA GPUs only; this experiment runs on CPU (gpus_per_worker: 0)")
    return tree


def validate_search(source: YamlSource, components: Components) -> tuple[SearchFile, dict[str, Any]]:
    """Validate a parsed search file; returns the spec and the normalised base experiment."""
    out = _Collector(source)
    data = source.data()
    if data == {} and not source.overrides:  # blank, or comments only
        out.add((), "the file is empty: a search file needs at least 'name' and 'base'")
        out.raise_if_any()
    if not isinstance(data, dict):
        out.add((), "the file must be a mapping with at least 'name' and 'base'")
        out.raise_if_any()
    if not any(key in TOP_LEVEL_KEYS for key in data):  # e.g. `fluxtune validate /etc/passwd`: say so, echo nothing
        out.add((), f"not a fluxtune search or experiment file: none of its {len(data)} top-level keys is one of "
                    f"{', '.join(TOP_LEVEL_KEYS)}")
        out.raise_if_any()
    _number_problems(data, (), out)
    _name_problems(data, out)
    try:
        spec = SearchFile.model_validate(data)
    except ValidationError as exc:
        out.add_validation((), exc)
        out.raise_if_any()
        raise  # unreachable: the collector raised
    out.raise_if_any()
    base = normalise_experiment(spec.base, components, out, ("base",))
    if spec.search and spec.search.metric not in EVALUATION_METRICS:
        out.add(("search", "metric"), f"{spec.search.metric!r} is not reported at evaluations; the stages report "
                                      f"{', '.join(EVALUATION_METRICS)}")
    elif spec.search and spec.search.metric in PROBE_METRICS and base["sample_every"] != 1:
        out.add(("base", "sample_every"), f"search.metric {spec.search.metric} is measured by the validation "
                                          "preview, which then must run at every evaluation: use sample_every: 1")
    if spec.search and spec.search.include:
        spec.search.space = {**_included_space(spec.search.include, components, out), **spec.search.space}
    out.raise_if_any()
    if spec.search:
        searched: list[str] = []
        for path, dist in spec.search.space.items():
            _check_conditions(path, dist, searched, base, out)
            searched.append(path)
            try:
                get_path(base, path)
            except PathError as exc:
                out.add(("search", "space", path), f"not a key of base: {exc}")
                continue
            for value in dist.corners():
                try:
                    sample_experiment(base, {path: value}, components)
                except InputError as exc:
                    out.add(("search", "space", path), f"value {value!r} is invalid: {exc.problems[0].message}")
                    break
        from fluxtune.data.sweep_caches import searched_cache_problems  # import-light: no torch, no ray

        for path, message in searched_cache_problems(spec.search.space):
            out.add(("search", "space", path), message)
    out.raise_if_any()
    return spec, base


def _number_problems(node: Any, loc: tuple[Any, ...], out: _Collector) -> None:
    """`.inf`, `.nan` and integers beyond 64 bits mean nothing in a config; refused wherever they are (a float
    field would take them, and a sampler or a learning rate would then overflow or poison a run)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _number_problems(value, loc + (key,), out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _number_problems(value, loc + (i,), out)
    elif isinstance(node, float) and not math.isfinite(node):
        out.add(loc, f"{node} is not a finite number")
    elif isinstance(node, int) and not isinstance(node, bool) and abs(node) >= INT_LIMIT:
        out.add(loc, "integer out of range (beyond 64 bits)")


def _name_problems(data: dict[str, Any], out: _Collector) -> None:
    """Names become folders, MLflow experiment/model/alias names and console lines: never a secret."""
    from fluxtune.redact import secret_in

    tracking = data.get("tracking") if isinstance(data.get("tracking"), dict) else {}
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    names = [(("name",), data.get("name"))]
    names += [(("tracking", key), tracking.get(key)) for key in ("experiment", "register_as", "alias")]
    stages = base.get("stages") if isinstance(base.get("stages"), list) else []
    names += [(("base", "stages", i, "name"), s.get("name")) for i, s in enumerate(stages) if isinstance(s, dict)]
    for loc, value in names:
        what = secret_in(value) if isinstance(value, str) else None
        if what:
            out.add(loc, f"must not hold {what} (a name reaches folder names, MLflow and the console)")


def _included_space(names: list[str], components: Components, out: _Collector) -> dict[str, Any]:
    """The `search.include` fragments (registered search spaces) merged in order, each distribution checked."""
    from pydantic import TypeAdapter

    from fluxtune.config.schema import Distribution

    check = TypeAdapter(Distribution)
    merged: dict[str, Any] = {}
    for i, name in enumerate(names):
        try:
            entry = components.get("search_space", name)
            fragment = entry.build({})
        except UnknownComponent as exc:
            out.add(("search", "include", i), str(exc))
            continue
        for path, dist in dict(fragment).items():
            try:
                merged[path] = check.validate_python(dist)
            except ValidationError as exc:
                out.add(("search", "include", i), f"search space {name!r} of plugin {entry.provenance}: "
                        f"{path}: {exc.errors()[0]['msg']}")
    return merged


def _check_conditions(path: str, dist: Any, searched: list[str], base: dict[str, Any], out: _Collector) -> None:
    """A `when` key is a base value or a key searched *earlier* (define-by-run samples in file order)."""
    space = tuple(out.source.data().get("search", {}).get("space", {}))
    for key in dist.when:
        if key in searched:
            continue
        if key in space:
            out.add(("search", "space", path, "when", key), f"{key!r} is searched after {path!r}; move it above")
            continue
        try:
            get_path(base, key)
        except PathError as exc:
            out.add(("search", "space", path, "when", key), f"not a key of base or the space: {exc}")


def sample_experiment(base: dict[str, Any], values: dict[str, Any], components: Components) -> dict[str, Any]:
    """The normalised experiment with sampled `values` at their dotted paths, validated again."""
    tree = _switch_components(base, values)
    for path, value in values.items():
        try:
            tree = set_path(tree, path, value)
        except PathError:
            tree = _set_new_param(tree, path, value)
    source = YamlSource(path="<sampled config>", text="", tree=None)
    for path, value in values.items():  # a problem at a sampled key names the value that put it there
        try:
            source.overrides[locate(tree, path).loc] = f"<sampled {path}={value!r}>"
        except PathError:  # a later value replaced what held it: its problems name the whole config
            continue
    out = _Collector(source)
    try:
        exp = Experiment.model_validate(tree)
    except ValidationError as exc:
        out.add_validation((), exc)
        out.raise_if_any()
        raise
    normalised = normalise_experiment(exp, components, out, ())
    out.raise_if_any()
    return normalised


def _switch_components(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A sampled `X.type` that differs from the base replaces component X: the old type's params go
    (the new type's defaults fill in), so `timesteps.type: [uniform, logit_normal]` is a valid space."""
    tree = base
    for path, value in values.items():
        if not path.endswith(".type") or path.count(".") < 1:
            continue
        parent = path.removesuffix(".type")
        try:
            current = get_path(tree, parent)
        except PathError:
            continue
        if isinstance(current, dict) and current.get("type") != value and "name" not in current:
            tree = set_path(tree, parent, {"type": value})
    return tree


def _set_new_param(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A param of a switched component that its base value did not have (e.g. `timesteps.std`)."""
    parent, _, key = path.rpartition(".")
    try:
        node = get_path(tree, parent)
    except PathError:
        node = None
    if not isinstance(node, dict) or "type" not in node:
        raise InputError.single("<sampled config>", f"{path}: {key!r} does not exist here", key=path)
    return set_path(tree, path, value, new_key=True)


def load_search_file(path: str | Path, components: Components | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchFile, dict[str, Any]]:
    """Parse, apply `--set key.path=value` overrides, validate. Raises one InputError with every problem."""
    from fluxtune.components import loaded_components

    return validate_search(apply_overrides(load_yaml(path), overrides), components or loaded_components())


def load_search_text(text: str, components: Components | None = None, path: str = "<string>"):
    from fluxtune.components import loaded_components

    return validate_search(parse_yaml(text, path), components or loaded_components())


__all__ = ["load_search_file", "load_search_text", "located_problem", "sample_experiment", "stage_loc"]
