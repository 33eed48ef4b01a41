"""The example plugin packages of plugins/, installed with pip as a team would, seen through the real CLI:
`fluxtune plugins`, the load/disable variables, and broken packages reported by name with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_cli

EXAMPLES = ("fluxtune-ema", "fluxtune-dora", "fluxtune-masked-l1")
DEMO = REPO / "plugins" / "plugins_demo.yaml"


def pip_install(packages: list[Path], target: Path) -> None:
    """A real, non-editable pip install into `target` (used via PYTHONPATH, so the venv stays untouched)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *map(str, packages)], check=True, timeout=300)


def install_examples(tmp: Path) -> Path:
    sources = tmp / "src"
    for name in EXAMPLES:  # build from a copy: pip's in-tree build would leave build/ and egg-info in plugins/
        shutil.copytree(REPO / "plugins" / name, sources / name, ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__"))
    pip_install([sources / name for name in EXAMPLES], tmp / "site")
    return tmp / "site"


@pytest.fixture
def env(cli_env, examples_site) -> dict[str, str]:
    env = {k: v for k, v in cli_env.items() if not k.startswith("FLUXTUNE_") or k == "FLUXTUNE_CACHE"}
    return {**env, "PYTHONPATH": str(examples_site)}


def test_installed_examples_are_listed_with_version_and_what_they_register(env, tmp_path):
    result = run_cli(["plugins", "--json"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(records) == {"ema", "dora", "masked_l1"}  # built-ins only with --all
    assert (records["ema"]["distribution"], records["ema"]["version"]) == ("fluxtune-ema", "0.1.0")
    assert [e["name"] for e in records["ema"]["registers"]["stage"]] == ["ema"]
    assert [e["name"] for e in records["dora"]["registers"]["adapter"]] == ["dora"]
    assert [e["name"] for e in records["dora"]["registers"]["search_space"]] == ["dora_rank"]
    assert [e["name"] for e in records["masked_l1"]["registers"]["loss"]] == ["masked_l1"]

    text = run_cli(["plugins", "--all"], tmp_path, env).stdout
    assert "ema (fluxtune-ema 0.1.0) fluxtune_ema" in text and "stage ema: full fine-tune" in text
    assert "fluxtune.default_plugins.stages (built-in)" in text and "callback nan_guard" in text


def test_the_demo_validates_only_with_the_plugins_loaded(env, tmp_path):
    ok = run_cli(["validate", str(DEMO)], tmp_path, env)
    assert ok.returncode == 0, ok.stderr
    assert "3 searched keys" in ok.stdout  # the file's own key + the 2 of the dora_rank fragment

    without = run_cli(["validate", str(DEMO)], tmp_path, {**env, "FLUXTUNE_DISABLE_PLUGINS": "dora"})
    assert without.returncode == 2
    assert "plugins_demo.yaml:24:17: base.stages[2].adapter.type: unknown adapter 'dora' (available: lora)" in without.stderr
    assert "search.include[0]: unknown search_space 'dora_rank'" in without.stderr

    only = run_cli(["plugins"], tmp_path, {**env, "FLUXTUNE_LOAD_PLUGINS": "ema"})
    assert only.returncode == 0 and "ema (" in only.stdout and "dora" not in only.stdout


def test_a_misspelt_plugin_name_in_the_variables_is_an_error_with_a_did_you_mean(env, tmp_path):
    result = run_cli(["plugins"], tmp_path, {**env, "FLUXTUNE_LOAD_PLUGINS": "ema,masked-l1"})
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: FLUXTUNE_LOAD_PLUGINS: no installed plugin is named 'masked-l1' "
                                      "(installed: dora, ema, masked_l1); did you mean 'masked_l1'?")


BROKEN = {
    "fluxtune-broken": ("broken", "import torchvision_that_is_not_installed\n"),
    "fluxtune-typo": ("typo", textwrap.dedent("""
        import fluxtune

        @fluxtune.hookimpl
        def register_loss(register):  # misspelt: register_losses
            pass
    """)),
}


def test_broken_plugins_are_named_all_at_once_and_can_be_disabled(env, tmp_path):
    for dist, (entry, code) in BROKEN.items():
        package = tmp_path / "src" / dist
        module = dist.replace("-", "_")
        (package / module).mkdir(parents=True)
        (package / module / "__init__.py").write_text(code)
        (package / "pyproject.toml").write_text(textwrap.dedent(f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{dist}"
            version = "2.0"
            [project.entry-points.fluxtune]
            {entry} = "{module}"
        """))
    pip_install([tmp_path / "src" / d for d in BROKEN], tmp_path / "site")
    env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{tmp_path / 'site'}"}

    result = run_cli(["plugins"], tmp_path, env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == ("error: plugin 'broken' (fluxtune-broken 2.0): failed to import fluxtune_broken: "
                        "ModuleNotFoundError: No module named 'torchvision_that_is_not_installed'; "
                        "disable it with FLUXTUNE_DISABLE_PLUGINS=broken")
    assert lines[1].startswith("error: plugin 'typo' (fluxtune-typo 2.0): implements unknown hook 'register_loss'")
    assert "did you mean 'register_losses'?" in lines[1] and lines[1].endswith("FLUXTUNE_DISABLE_PLUGINS=typo")
    assert len(lines) == 2

    disabled = run_cli(["plugins"], tmp_path, {**env, "FLUXTUNE_DISABLE_PLUGINS": "broken,typo"})
    assert disabled.returncode == 0, disabled.stderr
    assert "ema (fluxtune-ema 0.1.0)" in disabled.stdout


def test_validate_stays_import_light_with_the_plugins_loaded(env, tmp_path):
    # Hooks run in every process and at every CLI start: the examples import torch/peft only inside factories.
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'ray', 'diffusers', 'peft') "
             "if m in sys.modules)))\n"
             f"sys.argv = ['fluxtune', 'validate', {str(DEMO)!r}]\n"
             "from fluxtune.cli.main import main\n"
             "main()\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "plugins_demo.yaml: ok" in result.stdout, result.stderr
    assert result.stdout.strip().endswith("HEAVY []")
