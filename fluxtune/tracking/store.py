"""Where runs are recorded: the YAML's URI, $MLFLOW_TRACKING_URI, or the local store under ./mlflow."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR_ENV = "FLUXTUNE_MLFLOW_DIR"


def default_store_dir() -> Path:
    return Path(os.environ.get(DEFAULT_DIR_ENV, "mlflow")).resolve()


def tracking_uri(configured: str | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def server_uri(configured: str | None = None) -> str | None:
    """The tracking URI when it names an HTTP(S) server (which can be down); None for a local store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    return uri if uri.startswith(("http://", "https://")) else None


def unreachable(uri: str, timeout: float = 5.0, healthy: bool = False) -> str | None:
    """Why the MLflow server at `uri` does not answer, or None when it does. Any HTTP answer counts (a proxy
    asking for credentials is there) unless `healthy`: then only MLflow's own 200 from /health. MLflow's own
    client would retry for minutes before saying the same."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from /health" if healthy else None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:  # timeouts, resets
        return str(exc) or type(exc).__name__


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of the default local store live beside its db (mlflow/artifacts); servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts" / experiment).as_uri()
    return None


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow's UI opens an experiment in the view its kind names; without this tag it guesses GenAI (traces, costs).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's "Machine learning": runs table


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created when missing; either way it opens as model training in the UI."""
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is None:
        return c.create_experiment(name, artifact_location=artifact_location(uri, name), tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # made by an older fluxtune: a kind chosen in the UI stays
            c.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id
