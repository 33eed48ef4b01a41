"""Model registry: a trial's adapter as a pyfunc model version, lineage tags, aliases (never deprecated stages).

A version holds the adapter and a *reference* to its base transformer (a stage checkpoint or the configured
model, with content hashes; see `fluxtune.version_contents`), never a copy of the base.
New versions get the alias `candidate`; people promote one by moving `champion` (here, `fluxtune models
promote`, or the MLflow UI), and `model: {adapter: "models:/NAME@champion"}` starts a new search from it.
Alias versions come back as int from a sqlite store and as str over HTTP: everything here speaks str.
"""

from __future__ import annotations

import base64
import getpass
import io
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fluxtune.config.errors import InputError
from fluxtune.version_contents import (MODEL_JSON, RegisteredBaseError, check_reference, describe, read_meta)
from fluxtune.tracking.store import client

MODEL_CODE = Path(__file__).with_name("pyfunc_entry.py")  # logged as code, so loading never unpickles
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc's artifact: model.json + adapter/ (+ fused/)
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def register_adapter(uri: str, run_id: str, model_name: str, alias: str | None, adapter_dir: Path | None,
                     base: dict[str, Any] | None, model_spec: dict[str, Any], tags: dict[str, Any],
                     description: str = "") -> str:
    """Log adapter + base reference as a pyfunc model in the trial's run, register it, point `alias` (if any)
    at it. `base`: a reference (`fluxtune.version_contents`), or None for the model `model_spec` names.

    Lineage tags are the caller's (sweep, trial, cycle, stage, search_metric) plus what the runs know: the
    trial's final metrics (`metric.<name>`), the data hash of the sweep, the fluxtune version; each key once.
    The trial's run keeps its status and end time (logging the model reopens it for a moment).
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from fluxtune import __version__
    from fluxtune.tracking.pyfunc import example_check_only

    started_from = model_spec.get("adapter")  # a registered version the search started from (a local folder)
    model_spec = {k: v for k, v in model_spec.items() if k != "adapter"}  # that folder is not portable
    fused: list[Path] = []
    if base is None and started_from:  # the adapter was trained on that version, merged: its base + its adapters
        earlier = read_meta(started_from)
        base = earlier.get("base")
        fused = [Path(started_from) / name for name in earlier.get("fused", [])]
        if (Path(started_from) / "adapter").is_dir():
            fused.append(Path(started_from) / "adapter")
    check_reference(base, verify=False)  # the caller verified the hashes; a vanished base is refused here too
    c = client(uri)
    run_before = c.get_run(run_id).info
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / CHECKPOINT_ARTIFACT
        folder.mkdir()
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, folder / "adapter")
        for i, adapter in enumerate(fused):
            shutil.copytree(adapter, folder / "fused" / str(i))
        (folder / MODEL_JSON).write_text(json.dumps({"model": model_spec, "base": base,
                                                     "fused": [f"fused/{i}" for i in range(len(fused))]}))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "image"), ColSpec("string", "mask"),
                           ColSpec("string", "prompt", required=False)]),
            outputs=Schema([ColSpec("string", "image")]),
            params=ParamSchema([ParamSpec("steps", "long", 8), ParamSpec("seed", "long", 0)]))
        with mlflow.start_run(run_id=run_id), example_check_only():
            info = mlflow.pyfunc.log_model(
                name="inpainter", python_model=str(MODEL_CODE), artifacts={CHECKPOINT_ARTIFACT: str(folder)},
                registered_model_name=model_name, pip_requirements=[f"fluxtune=={__version__}"],
                signature=signature, input_example=input_example(),
            )
    if run_before.end_time:  # the trial's run ended with its training, not with its registration
        c.set_terminated(run_id, status=run_before.status, end_time=run_before.end_time)
    else:
        c.update_run(run_id, status=run_before.status)
    version = str(info.registered_model_version)
    merged = {**lineage_tags(c, run_id), **{k: str(v) for k, v in tags.items()},
              "base": describe(base, model_spec)}
    for key, value in merged.items():
        c.set_model_version_tag(model_name, version, key, str(value))
    if description:
        c.update_model_version(model_name, version, description=description)
    if alias:
        c.set_registered_model_alias(model_name, alias, version)
    return version


def input_example():
    """One 16×16 image and its mask (base64 PNGs) and a prompt: the smallest input the model accepts."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    def png(array) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    image = np.full((16, 16, 3), 128, np.uint8)
    mask = np.pad(np.full((8, 8), 255, np.uint8), 4)
    return pd.DataFrame({"image": [png(image)], "mask": [png(mask)], "prompt": ["a red door"]})


def lineage_tags(c: Any, run_id: str) -> dict[str, str]:
    """What the run tree knows about a trial: its final metrics, the sweep's data hash, the fluxtune version."""
    run = c.get_run(run_id)
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in run.data.metrics.items()
            if "/" not in k and not k.startswith("system")}
    parent_id = run.data.tags.get("mlflow.parentRunId")
    parent = c.get_run(parent_id) if parent_id else None
    data_hash = parent.data.params.get("data.cache_key") if parent else None
    tags["data_hash"] = data_hash or run.data.params.get("data.jsonl", "")
    tags["fluxtune_version"] = (parent or run).data.tags.get("fluxtune.version", "")
    if parent:
        tags["sweep_run"] = parent.info.run_id
    return tags


def promote(uri: str, model_name: str, version: str, alias: str, who: str | None = None) -> str | None:
    """Point `alias` at `version`; who/when go on the version as tags. Returns the version it pointed at before."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise InputError.single(model_name, f"no version {version} of registered model {model_name!r} "
                                            f"at {uri}: {exc.message}", key="version") from None
    before = aliases_of(c, model_name).get(alias)
    c.set_registered_model_alias(model_name, alias, str(version))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    c.set_model_version_tag(model_name, str(version), f"alias.{alias}.by", who or _user())
    c.set_model_version_tag(model_name, str(version), f"alias.{alias}.at", now)
    if before is not None and before != str(version):
        c.set_model_version_tag(model_name, str(version), f"alias.{alias}.replaced", before)
    return before


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): still record something honest
        return "unknown"


def aliases_of(c: Any, model_name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in (c.get_registered_model(model_name).aliases or {}).items()}


def registered_names(uri: str) -> list[str]:
    return sorted(m.name for m in client(uri).search_registered_models())


def versions(uri: str, model_name: str) -> list[dict[str, Any]]:
    """Versions with their aliases, lineage tags and metric values, oldest first."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases_of(c, model_name).items():
            by_version.setdefault(version, []).append(alias)
    except MlflowException:
        raise InputError.single(model_name, f"no registered model {model_name!r} at {uri}") from None
    out = []
    for mv in c.search_model_versions(f"name='{model_name}'"):
        tags = dict(mv.tags or {})
        out.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                    "run_id": mv.run_id, "created": mv.creation_timestamp, "tags": tags,
                    "metrics": {k.removeprefix("metric."): v for k, v in tags.items() if k.startswith("metric.")}})
    return sorted(out, key=lambda v: int(v["version"]))


def parse_model_uri(value: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@alias or models:/NAME/VERSION → (name, alias, version)."""
    match = _MODEL_URI.match(value)
    if not match:
        raise ValueError(f"{value!r} is not models:/NAME@alias or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def resolve_registered_model(model: dict[str, Any], uri: str, into: Path) -> dict[str, Any]:
    """`model: {adapter: models:/NAME@alias}` → the version's checkpoint downloaded under `into` (which Ray
    workers can read), with the base it was trained on filled in. Runs once, in the driver, before any trial:
    an alias moved mid-sweep must not change what later trials start from."""
    source = model.get("adapter")
    if not source or not str(source).startswith("models:/"):
        return model
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(source)
    c = client(uri)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as exc:
        raise InputError.single(uri, f"{source} not found in this registry: {exc.message}",
                                key="base.model.adapter") from None
    target = Path(into) / "registered" / name / str(mv.version)
    checkpoint = target / CHECKPOINT_ARTIFACT
    if not (checkpoint / MODEL_JSON).exists():
        import mlflow.artifacts

        partial = target.with_name(f".{mv.version}.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        # The version's storage location, not a models:/ URI: that one resolves through the global registry URI.
        location = c.get_model_version_download_uri(name, str(mv.version))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(partial),
                                                         tracking_uri=uri))
        found = next(local.rglob(MODEL_JSON)).parent
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        found.rename(checkpoint)  # complete before it has its final name
        shutil.rmtree(partial, ignore_errors=True)
    meta = read_meta(checkpoint)
    try:  # before any trial: a base that is gone or changed is named once, here
        check_reference(meta.get("base"), verify=True)
    except RegisteredBaseError as exc:
        raise InputError.single(uri, f"{source}: {exc}", key="base.model.adapter") from None
    registered = meta["model"]
    resolved = {**model, "adapter": str(checkpoint)}
    if model.get("preset") is None and model.get("path") is None:
        resolved.update({k: registered[k] for k in ("preset", "path", "seed") if registered.get(k) is not None})
    return resolved
