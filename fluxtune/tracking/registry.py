"""Model registry: register a trial's adapter as a pyfunc model version, aliases (never deprecated stages)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fluxtune.tracking.store import client

MODEL_CODE = Path(__file__).with_name("pyfunc_entry.py")  # logged as code, so loading never unpickles


def register_adapter(uri: str, run_id: str, model_name: str, alias: str, adapter_dir: Path | None,
                     base_transformer_dir: Path | None, model_spec: dict[str, Any], tags: dict[str, str]) -> str:
    """Log base + adapter as a pyfunc model in the trial's run, register it, point `alias` at it."""
    import mlflow

    from fluxtune import __version__

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "checkpoint"
        folder.mkdir()
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, folder / "adapter")
        if base_transformer_dir is not None:
            shutil.copytree(base_transformer_dir, folder / "base")
        (folder / "model.json").write_text(json.dumps({"model": model_spec}))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="inpainter", python_model=str(MODEL_CODE), artifacts={"checkpoint": str(folder)},
                registered_model_name=model_name, pip_requirements=[f"fluxtune=={__version__}"],
            )
    version = str(info.registered_model_version)
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, str(value))
    c.set_registered_model_alias(model_name, alias, version)
    return version


def versions(uri: str, model_name: str) -> list[dict[str, Any]]:
    """Versions with their aliases (alias versions are int in sqlite, str over HTTP: normalise to str)."""
    c = client(uri)
    model = c.get_registered_model(model_name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    out = []
    for mv in c.search_model_versions(f"name='{model_name}'"):
        out.append({"version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                    "run_id": mv.run_id, "tags": dict(mv.tags or {})})
    return sorted(out, key=lambda v: int(v["version"]))
