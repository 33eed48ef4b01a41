"""What a plugin author meets: params models are closed whatever they subclass, `validate_experiment` checks an
experiment against the model before anything runs, `fluxtune plugins --params` shows every parameter, and a
broken plugin leaves `fluxtune --help` working."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import fluxtune
import fluxtune.testing as ft
from conftest import run_cli, run_in_process
from fluxtune.components import ComponentError
from test_bad_inputs import fake_install

REPO = Path(__file__).resolve().parents[1]


class PlainParams(BaseModel):  # not fluxtune.Params: pydantic's default drops unknown keys
    """How far the loss looks."""

    delta: float = Field(1.0, gt=0, description="where the loss turns linear")


class PlainLoss:
    def __init__(self, params: PlainParams):
        self.params = params

    def __call__(self, pred, target, batch):
        return (pred - target).abs().mean()


class PlainPlugin:
    @fluxtune.hookimpl
    def register_losses(self, register):
        register("plain_huber", PlainLoss, params=PlainParams, doc="a loss with a plain BaseModel")


SPEC = """\
name: authors
base:
  loss: {type: plain_huber, detla: 0.5}
  stages:
    - {name: full, type: full, steps: 2}
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "RAY_ADDRESS", "FLUXTUNE_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FLUXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_plain_basemodel_params_is_closed_and_the_factory_still_gets_its_own_class():
    with ft.registered_plugin(PlainPlugin(), name="plain") as components:
        entry = components.get("loss", "plain_huber")
        loss = entry.build({"delta": 0.5})
        assert isinstance(loss.params, PlainParams) and loss.params.delta == 0.5
        with pytest.raises(ValueError, match="detla"):
            entry.build({"detla": 0.5})


def test_a_misspelt_key_of_a_plain_basemodel_is_one_line_at_its_file_line(work, monkeypatch, capsys):
    (work / "sweep.yaml").write_text(SPEC)
    with ft.registered_plugin(PlainPlugin(), name="plain"):
        code, err = run_in_process(["validate", "sweep.yaml"], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    column = SPEC.splitlines()[2].index("detla") + 1  # problems point at the key itself
    assert errors == [f"error: sweep.yaml:3:{column}: base.loss.detla: unknown key"]


def test_a_params_model_that_allows_extra_keys_keeps_them_on_purpose():
    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")

    class OpenPlugin:
        @fluxtune.hookimpl
        def register_losses(self, register):
            register("open_loss", lambda params: params, params=Open)

    with ft.registered_plugin(OpenPlugin(), name="open") as components:
        assert components.get("loss", "open_loss").build({"anything": 1}).model_extra == {"anything": 1}


def test_a_nested_model_that_would_drop_keys_is_refused_naming_the_plugin_and_field():
    class Inner(BaseModel):
        size: int = 1

    class Outer(fluxtune.Params):
        inner: Inner = Inner()

    class NestedPlugin:
        @fluxtune.hookimpl
        def register_losses(self, register):
            register("nested_loss", lambda params: params, params=Outer)

    with pytest.raises(ComponentError) as error:
        with ft.registered_plugin(NestedPlugin(), name="nested"):
            pass
    message = str(error.value)
    assert "plugin 'nested' (<in-process> 0)" in message and "params field inner" in message
    assert "subclass fluxtune.Params" in message


# -- validate_experiment

BLOCKS_PLUGIN = """
    from pydantic import Field
    import fluxtune

    class BlockParams(fluxtune.Params):
        block: int = Field(0, ge=0)

    @fluxtune.hookimpl
    def register_losses(register):
        register("block_loss", lambda params: None, params=BlockParams, doc="compares one block's features")

    @fluxtune.hookimpl
    def validate_experiment(experiment, model):
        loss = experiment["loss"]
        if loss["type"] != "block_loss" or model is None:
            return []
        blocks = model["num_layers"] + model["num_single_layers"]
        if loss["block"] >= blocks:
            return [("loss.block", f"block {loss['block']} does not exist: the model has {blocks} blocks")]
        return []
"""
BLOCKS_SPEC = """\
name: blocks
base:
  loss: {type: block_loss, block: BLOCK}
  stages:
    - {name: full, type: full, steps: 2}
search:
  num_samples: 2
  space:
    loss.block: {type: categorical, choices: [0, CHOICE]}
"""


def _fake_installed(tmp_path: Path, dist: str, entry: str, code: str) -> dict[str, str]:
    """The environment of a console script that sees `code` installed as `dist` (and this checkout first)."""
    fake_install(tmp_path / "site", dist, entry, code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "FLUXTUNE_"))}
    paths = [str(tmp_path / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "FLUXTUNE_CACHE": str(tmp_path / "cache"),
            "PYTHONDONTWRITEBYTECODE": "1"}


def test_validate_experiment_problems_are_one_line_each_naming_the_plugin_and_the_key(tmp_path):
    env = _fake_installed(tmp_path, "fluxtune-blocks", "blocks", BLOCKS_PLUGIN)
    work = tmp_path / "work"
    work.mkdir()
    (work / "sweep.yaml").write_text(BLOCKS_SPEC.replace("BLOCK", "5").replace("CHOICE", "1"))
    column = BLOCKS_SPEC.splitlines()[2].index("block:") + 1
    for command in (["validate", "sweep.yaml"], ["search", "sweep.yaml"]):
        result = run_cli(command, work, env, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[0] == (
            f"error: sweep.yaml:3:{column}: base.loss.block: block 5 does not exist: the model has 2 blocks "
            "(plugin 'blocks' (fluxtune-blocks 1.0))")
    assert sorted(p.name for p in work.iterdir()) == ["sweep.yaml"]  # refused before Ray: nothing written

    (work / "sweep.yaml").write_text(BLOCKS_SPEC.replace("BLOCK", "0").replace("CHOICE", "7"))
    result = run_cli(["validate", "sweep.yaml"], work, env, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: sweep.yaml:9:5: search.space.loss.block: value 7: block 7 does not exist: the model has 2 blocks "
        "(plugin 'blocks' (fluxtune-blocks 1.0))"]

    (work / "sweep.yaml").write_text(BLOCKS_SPEC.replace("BLOCK", "1").replace("CHOICE", "0"))
    result = run_cli(["validate", "sweep.yaml"], work, env, timeout=120)
    assert result.returncode == 0 and "sweep.yaml: ok" in result.stdout, result.stderr


def test_a_validate_experiment_hook_may_take_only_what_it_needs_and_its_failures_are_named():
    from fluxtune.plugins import experiment_problems

    class Picky:
        @fluxtune.hookimpl
        def validate_experiment(self, experiment):
            return f"{len(experiment['stages'])} stages are too many"

    class Broken:
        @fluxtune.hookimpl
        def validate_experiment(self, model):
            raise KeyError("num_blocks")

    class Vague:
        @fluxtune.hookimpl
        def validate_experiment(self):
            return [42]

    experiment = ft.tiny_experiment("stages: [{name: full, type: full, steps: 1}]")
    with ft.registered_plugin(Picky(), name="picky"), ft.registered_plugin(Broken(), name="broken"), \
            ft.registered_plugin(Vague(), name="vague"):
        found = {p.plugin: (p.key, p.message) for p in experiment_problems(experiment, {"num_layers": 1})}
    assert found["'picky' (<in-process> 0)"] == ("", "1 stages are too many")
    assert found["'broken' (<in-process> 0)"][1].startswith("validate_experiment failed: KeyError: 'num_blocks'; "
                                                            "disable it with FLUXTUNE_DISABLE_PLUGINS=broken")
    assert "returned 42: expected a message or a (key, message) pair" in found["'vague' (<in-process> 0)"][1]


def test_the_builtin_lora_adapter_checks_its_targets_through_the_same_hook():
    from fluxtune.flux.presets import preset
    from fluxtune.plugins import experiment_problems

    experiment = ft.tiny_experiment("stages: [{name: lora, type: lora, steps: 1, adapter: {type: lora, targets: "
                                    "[attn.to_q, proj_in]}}]")
    found = experiment_problems(experiment, dict(preset("tiny-fill").transformer))
    assert [(p.plugin.split()[0], p.key) for p in found] == [("'fluxtune.default_plugins.adapters'",
                                                               "stages.lora.adapter.targets")]
    assert "LoRA targets ['proj_in'] match no Linear layer" in found[0].message


# -- fluxtune plugins --params

def test_plugins_params_text_and_json(monkeypatch, capsys):
    from fluxtune.cli.main import main

    def run(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["fluxtune", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main()
        assert exit.value.code == 0
        return capsys.readouterr().out

    with ft.registered_plugin(PlainPlugin(), name="plain"):
        text = run("plugins", "--params")
        records = json.loads(run("plugins", "--params", "--json"))
        builtins = json.loads(run("plugins", "--all", "--params", "--json"))
    assert "  loss plain_huber: a loss with a plain BaseModel" in text
    assert "      How far the loss looks." in text
    assert "      delta: float = 1.0 (> 0): where the loss turns linear" in text
    (plain,) = [r for r in records if r["name"] == "plain"]
    (item,) = plain["registers"]["loss"]
    assert item["params"] == [{"name": "delta", "type": "float", "required": False, "default": 1.0,
                               "limits": "> 0", "description": "where the loss turns linear"}]
    lora = next(i for r in builtins for i in r["registers"].get("adapter", []) if i["name"] == "lora")
    rank = next(p for p in lora["params"] if p["name"] == "rank")
    assert (rank["type"], rank["default"], rank["limits"]) == ("int", 64, "≥ 1")
    uniform = next(i for r in builtins for i in r["registers"].get("timestep_sampler", []) if i["name"] == "uniform")
    assert uniform["params"] == []


# -- a broken plugin

def test_a_plugin_that_raises_on_import_leaves_help_working(tmp_path):
    env = _fake_installed(tmp_path, "fluxtune-exploding", "exploding", "raise RuntimeError('boom at import')\n")
    warning = ("warning: plugin 'exploding' (fluxtune-exploding 1.0): failed to import fluxtune_exploding: "
               "RuntimeError: boom at import; disable it with FLUXTUNE_DISABLE_PLUGINS=exploding")
    for args in (["--help"], ["validate", "--help"], ["--version"]):
        result = run_cli(args, tmp_path, env, timeout=120)
        assert result.returncode == 0 and result.stderr.splitlines() == [warning], (args, result.stderr)
    assert "validate" in run_cli(["--help"], tmp_path, env, timeout=120).stdout
    result = run_cli(["plugins"], tmp_path, env, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [warning.replace("warning:", "error:", 1)]

