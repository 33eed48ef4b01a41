"""Security properties, each checked through what fluxtune really does: YAML is loaded safely, weights are only ever
safetensors (and nothing is unpickled), the MLflow UI binds 127.0.0.1 unless told otherwise, secrets never reach
MLflow, and plugins load only from installed entry points."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import FLUXTUNE, REPO, run_cli
from test_bad_inputs import fake_install

WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".safetensors"}
# Ray Tune's own experiment bookkeeping (trainable, tuner, searcher state), written and read back by Ray on
# `--resume` in the same user's folder: never weights, never downloaded from anyone else.
RAY_BOOKKEEPING = re.compile(r"^(trainable|tuner|searcher-state-[\w.-]+)\.pkl$")


@pytest.mark.e2e
def test_secrets_reach_no_mlflow_param_tag_metric_or_artifact(reference_sweep):
    """The reference sweep ran with secrets in the environment, the YAML (a plugin's params) and a `--set`."""
    marker, work = reference_sweep.marker, reference_sweep.work
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    client = reference_sweep.client()
    runs = reference_sweep.runs("sweep") + reference_sweep.runs("trial")
    assert len(runs) == 3  # the sweep and its two trials
    for run in runs:
        recorded = {**run.data.params, **run.data.tags, **{k: "" for k in run.data.metrics}}
        assert not [k for k, v in recorded.items() if marker in k or marker in v], run.info.run_id
    sweep = next(r for r in runs if r.data.tags["fluxtune.kind"] == "sweep")
    params = sweep.data.params
    assert "base.callbacks" in params and "'api_token': '***'" in params["base.callbacks"]
    assert "https://bot:***@hooks.example.org/x" in params["base.callbacks"]
    assert "${HF_TOKEN}" in params["base.callbacks"]  # YAML is never expanded from the environment
    spec = Path(client.download_artifacts(sweep.info.run_id, "reference.yaml", str(reference_sweep.root / "spec")))
    assert "api_token: ***" in spec.read_text() and "name: reference" in spec.read_text()
    for version in client.search_model_versions("name='reference-model'"):
        assert not [k for k, v in version.tags.items() if marker in v]
    # Every byte MLflow keeps: the sqlite store (params, tags, metric names) and every artifact, text or not.
    leaks = [str(p) for p in (work / "mlflow").rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.e2e
def test_every_weights_file_a_run_writes_is_safetensors(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    files = [p for p in reference_sweep.root.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    assert any(p.suffix == ".safetensors" and "transformer" in p.parts for p in weights)  # stage checkpoint
    assert any(p.name == "pytorch_lora_weights.safetensors" for p in weights)  # the exported adapter
    others = [p for p in weights if p.suffix != ".safetensors" and not RAY_BOOKKEEPING.match(p.name)]
    assert others == [], others
    # Ray's own pickles never sit inside a stage checkpoint or the MLflow store
    for p in weights:
        if p.suffix != ".safetensors":
            assert "mlflow" not in p.parts and not any(part.startswith("checkpoint_") for part in p.parts), p


def test_no_code_unpickles_without_weights_only():
    """torch.load only with weights_only=True; no pickle/joblib/np.load(allow_pickle=True) anywhere in fluxtune."""
    found = []
    for path in list((REPO / "fluxtune").rglob("*.py")) + list((REPO / "plugins").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if {"pickle", "cloudpickle", "dill", "joblib"} & {str(n).split(".")[0] for n in names}:
                    found.append(f"{path}:{node.lineno}: imports a pickle library")
            if not isinstance(node, ast.Call):
                continue
            call = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if call.endswith("torch.load") and keywords.get("weights_only") != "True":
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            if call.endswith("np.load") and keywords.get("allow_pickle") == "True":
                found.append(f"{path}:{node.lineno}: np.load(allow_pickle=True)")
    assert found == []


def test_a_python_yaml_tag_is_refused_at_its_line_and_never_runs(tmp_path, cli_env):
    pwned = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f'name: evil\nbase:\n  stages: !!python/object/apply:os.system ["touch {pwned}"]\n')
    result = run_cli(["validate", "evil.yaml"], tmp_path, cli_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: evil.yaml:3:11: YAML tag '!!python/object/apply:os.system' is not allowed")
    (tmp_path / "ok.yaml").write_text("name: ok\nbase:\n  stages: [{name: a, type: full, steps: 1}]\n")
    override = run_cli(["validate", "ok.yaml", "--set", f"name=!!python/object/apply:os.system [touch {pwned}]"],
                       tmp_path, cli_env)
    assert override.returncode == 2 and "error: --set name=" in override.stderr
    assert not pwned.exists()


def test_the_ui_binds_loopback_unless_told_otherwise(tmp_path, cli_env):
    """The `mlflow server` command line `fluxtune ui` really starts: 127.0.0.1 by default, `--host` to change."""
    assert _server_started_by(["ui"], tmp_path, cli_env)[-6:-4] == ["--host", "127.0.0.1"]
    assert _server_started_by(["ui", "--host", "0.0.0.0"], tmp_path, cli_env)[-6:-4] == ["--host", "0.0.0.0"]


def _server_started_by(args: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    import psutil

    from fluxtune.tracking.server import APP, free_port

    # SIGINT restored to its default: a test run started in the background of a shell without job control
    # inherits it ignored, and this `fluxtune ui` would then never see the Ctrl-C below (its test timed out so)
    ui = subprocess.Popen([str(FLUXTUNE), *args, "--port", str(free_port()), "--store", str(cwd / "store")],
                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server = None
    try:
        _line_with(ui, "starting the MLflow UI")
        while ui.poll() is None:
            for child in psutil.Process(ui.pid).children():
                try:
                    command = child.cmdline()
                except psutil.Error:  # gone between listing and reading
                    continue
                if command[1:4] == ["-m", "mlflow", "server"] or command[1:4] == ["-m", "uvicorn", APP]:
                    server = child
                    return command
        raise AssertionError(f"`fluxtune {' '.join(args)}` exited {ui.returncode} before starting a server")
    finally:
        os.killpg(ui.pid, signal.SIGINT)  # fluxtune stops its server (its own process group) on the way out
        ui.wait(timeout=60)
        if server is not None and server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            os.killpg(server.pid, signal.SIGTERM)  # Ctrl-C landed before fluxtune knew its server's pid


def _line_with(process: subprocess.Popen, text: str) -> str:
    for line in process.stdout:
        if text in line:
            return line
    raise AssertionError(f"{text!r} never printed (exit {process.wait()})")


def test_plugins_load_only_from_installed_entry_points_and_can_be_restricted(tmp_path, cli_env):
    site, work = tmp_path / "site", tmp_path / "work"
    imported = tmp_path / "imported"
    code = f"from pathlib import Path\nPath({str(imported)!r}).touch()\n"
    fake_install(site, "fluxtune-installed", "installed", code)
    fake_install(work, "fluxtune-local", "local", code)  # a dist-info in the working directory
    env = {k: v for k, v in cli_env.items() if not k.startswith("FLUXTUNE_") or k == "FLUXTUNE_CACHE"}

    listed = run_cli(["plugins", "--json"], work, {**env, "PYTHONPATH": str(site)})
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == ["installed"]  # not `local` from the cwd

    imported.unlink()
    only_none = run_cli(["plugins", "--json"], work, {**env, "PYTHONPATH": str(site), "FLUXTUNE_LOAD_PLUGINS": ""})
    assert only_none.returncode == 0 and json.loads(only_none.stdout) == []
    assert not imported.exists()  # a plugin left out is never imported

    # YAML cannot name code to load: there is no such key, and the file it names is never imported
    (work / "spec.yaml").write_text("name: x\nplugins: [fluxtune_local]\nbase:\n  stages: [{name: a, type: full, steps: 1}]\n")
    refused = run_cli(["validate", "spec.yaml"], work, {**env, "FLUXTUNE_LOAD_PLUGINS": ""})
    assert refused.returncode == 2 and "spec.yaml:2:1: plugins: unknown key" in refused.stderr
    assert not imported.exists()


def test_secret_names_are_redacted_but_content_hashes_are_not():
    from fluxtune.redact import REDACTED, redact_params

    params = {"tracking.api_token": "t0ps3cret", "aws_key": "AKIA0000", "data.cache_key": "6c7d1adb2443",
              "stages.lora.adapter.rank": "16"}
    assert redact_params(params) == {"tracking.api_token": REDACTED, "aws_key": REDACTED,
                                     "data.cache_key": "6c7d1adb2443", "stages.lora.adapter.rank": "16"}
