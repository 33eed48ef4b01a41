"""The plugin system in-process: components provenance and errors, validation by each component's own params,
loading rules, the driver's plugin set in workers, runtime callbacks, search fragments and CLI commands."""

from __future__ import annotations

import pytest
from pydantic import Field
from typer.testing import CliRunner

import fluxtune
import fluxtune.testing as ft
from fluxtune.components import ComponentError, loaded_components
from fluxtune.config.errors import InputError
from fluxtune.plugins import PluginSetMismatch, add_plugin, plugin_set, remove_plugin, use_plugin_set


class ScaleParams(fluxtune.Params):
    factor: float = Field(2.0, gt=0)


class ScaledLoss:
    def __init__(self, params: ScaleParams):
        self.factor = params.factor

    def __call__(self, pred, target, batch):
        return self.factor * (pred.float() - target.float()).pow(2).mean()


class LossPlugin:
    @fluxtune.hookimpl
    def register_losses(self, register):
        register("scaled_mse", ScaledLoss, params=ScaleParams, doc="MSE times a factor")


def test_entries_record_their_plugin_distribution_and_version():
    with ft.registered_plugin(LossPlugin(), name="scaler") as components:
        entry = components.get("loss", "scaled_mse")
        assert (entry.provenance.plugin, entry.provenance.distribution) == ("scaler", "<in-process>")
        builtin = components.get("stage", "lora").provenance
        assert (builtin.plugin, builtin.distribution, builtin.version) == (
            "fluxtune.default_plugins.stages", "fluxtune", fluxtune.__version__)
        assert plugin_set()["scaler"] == "<in-process>==0"
    assert "scaled_mse" not in loaded_components().names("loss")  # unregistered after the block
    assert "scaler" not in plugin_set()


def test_built_ins_are_registered_through_the_hooks():
    components = loaded_components()
    assert {"full", "lora"} <= set(components.names("stage"))
    assert components.names("adapter") == ["lora"] and "flow_matching" in components.names("loss")
    assert {"uniform", "logit_normal"} <= set(components.names("timestep_sampler")) and "nan_guard" in components.names("callback")
    assert {e.plugin for e in components.entries["stage"].values()} == {"fluxtune.default_plugins.stages"}


def test_a_duplicate_name_is_an_error_naming_both_plugins():
    class Twin:
        @fluxtune.hookimpl
        def register_adapters(self, register):
            register("lora", object, doc="another lora")

    with pytest.raises(ComponentError) as error:
        with ft.registered_plugin(Twin(), name="twin"):
            pass
    message = str(error.value)
    assert "adapter 'lora'" in message and "'fluxtune.default_plugins.adapters' (fluxtune" in message
    assert "'twin' (<in-process> 0)" in message and "replace=True" in message
    assert loaded_components().get("adapter", "lora").plugin == "fluxtune.default_plugins.adapters"  # nothing left over


def test_replace_true_takes_over_a_name_and_remembers_whose_it_was():
    class Better:
        @fluxtune.hookimpl
        def register_losses(self, register):
            register("flow_matching", ScaledLoss, params=ScaleParams, doc="replacement", replace=True)

    with ft.registered_plugin(Better(), name="better") as components:
        entry = components.get("loss", "flow_matching")
        assert entry.plugin == "better" and entry.replaced.plugin == "fluxtune.default_plugins.losses"
        assert entry.build({"factor": 3.0}).factor == 3.0


@pytest.mark.parametrize("args, complaint", [
    (("has space", ScaledLoss), "name 'has space' must be"),
    (("ok", "not callable"), "factory must be callable"),
    (("ok", ScaledLoss, dict), "params must be a pydantic model"),
])
def test_bad_registrations_name_the_plugin(args, complaint):
    class Bad:
        @fluxtune.hookimpl
        def register_losses(self, register):
            register(*args)

    with pytest.raises(ComponentError, match=complaint) as error:
        with ft.registered_plugin(Bad(), name="bad"):
            pass
    assert "plugin 'bad'" in str(error.value)


def test_a_failing_hook_is_reported_with_the_plugin_and_how_to_disable_it():
    class Crashes:
        @fluxtune.hookimpl
        def register_stages(self, register):
            raise ImportError("needs torchvision")

    with pytest.raises(ComponentError) as error:
        with ft.registered_plugin(Crashes(), name="crashes"):
            pass
    assert "'crashes'" in str(error.value) and "register_stages failed: ImportError: needs torchvision" in str(error.value)
    assert "FLUXTUNE_DISABLE_PLUGINS=crashes" in str(error.value)


def test_a_misspelt_hook_is_refused_with_a_did_you_mean():
    class Typo:
        @fluxtune.hookimpl
        def register_stage(self, register):
            pass

    with pytest.raises(InputError) as error:
        add_plugin(Typo(), "typo")
    [problem] = error.value.problems
    assert problem.file == "plugin 'typo'" and "unknown hook 'register_stage'" in problem.message
    assert "did you mean 'register_stages'?" in problem.message
    assert "typo" not in plugin_set()


def test_wrong_hook_arguments_are_refused():
    class WrongArgs:
        @fluxtune.hookimpl
        def register_losses(self, registrar):
            pass

    with pytest.raises(InputError, match="registrar"):
        add_plugin(WrongArgs(), "wrong-args")
    remove_plugin("wrong-args")


def test_unknown_names_fail_validation_with_location_and_did_you_mean():
    with ft.registered_plugin(LossPlugin(), name="scaler"):
        with pytest.raises(InputError) as error:
            ft.tiny_experiment("""
                stages: [{name: full, type: ful, steps: 1}]
                loss: {type: scaled_mes}
                callbacks: [{type: nan_gaurd}]
            """)
    by_key = {p.key: p for p in error.value.problems}
    assert set(by_key) == {"base.stages[0].type", "base.loss.type", "base.callbacks[0].type"}  # all at once
    assert "did you mean 'full'?" in by_key["base.stages[0].type"].message
    assert "did you mean 'scaled_mse'?" in by_key["base.loss.type"].message
    assert "available: flow_matching, scaled_mse" in by_key["base.loss.type"].message
    assert by_key["base.callbacks[0].type"].line == 5


def test_component_params_are_validated_by_their_own_model_at_their_line():
    with ft.registered_plugin(LossPlugin(), name="scaler"):
        with pytest.raises(InputError) as error:
            ft.tiny_experiment("""
                stages: [{name: full, type: full, steps: 1}]
                loss: {type: scaled_mse, factor: -1, fcator: 2}
            """)
        base = ft.tiny_experiment("stages: [{name: full, type: full, steps: 1}]\nloss: {type: scaled_mse}")
    problems = {p.key: p for p in error.value.problems}
    assert problems["base.loss.factor"].message.startswith("Input should be greater than 0")
    assert problems["base.loss.fcator"].message == "unknown key" and problems["base.loss.fcator"].line == 4
    assert base["loss"] == {"type": "scaled_mse", "factor": 2.0}  # defaults filled in by the plugin's model


@pytest.fixture
def pinned_process():
    yield
    use_plugin_set(None)  # back to the environment's rules for the other tests


def test_a_worker_loads_exactly_the_drivers_plugin_set(monkeypatch, pinned_process):
    driver = plugin_set()
    monkeypatch.setenv("FLUXTUNE_LOAD_PLUGINS", "")  # the worker's own environment is ignored once pinned
    use_plugin_set(driver)
    assert plugin_set() == driver
    wanted = {**driver, "fluxtune-ema-like": "fluxtune-ema==9.9"}
    with pytest.raises(PluginSetMismatch, match=r"missing fluxtune-ema-like \(fluxtune-ema==9.9\)"):
        use_plugin_set(wanted)
    other = {**driver, "fluxtune.default_plugins.stages": "fluxtune==0.0.1"}
    with pytest.raises(PluginSetMismatch, match="other versions fluxtune.default_plugins.stages: driver fluxtune==0.0.1"):
        use_plugin_set(other)


class Recorder:
    """A callback plugin recording the events it gets, returning an extra stage metric."""

    events: list = []

    class Params(fluxtune.Params):
        tag: str = "r"

    @fluxtune.hookimpl
    def register_callbacks(self, register):
        events = self.events

        class Record:
            def __init__(self, params):
                self.tag = params.tag

            def on_stage_start(self, ctx):
                events.append((self.tag, "start", ctx.name, ctx.cycle))

            def on_step_end(self, ctx, step, metrics):
                events.append((self.tag, "step", ctx.name, step, float(metrics["loss"]) > 0))

            def on_stage_end(self, ctx, metrics):
                events.append((self.tag, "end", ctx.name, "val_loss" in metrics))
                return {f"seen_{self.tag}": float(len(events))}

        register("record", Record, params=Recorder.Params)


def test_callbacks_get_stage_and_step_events_in_yaml_order_and_add_metrics(monkeypatch, session_cache):
    monkeypatch.setenv("FLUXTUNE_CACHE", str(session_cache))
    Recorder.events.clear()
    with ft.registered_plugin(Recorder(), name="recorder"):
        run = ft.run_tiny("""
            eval_every: 100
            callbacks: [{type: record, tag: a}, {type: nan_guard, every: 1}, {type: record, tag: b}]
            stages: [{name: full, type: full, steps: 2}]
        """)
    assert Recorder.events == [
        ("a", "start", "full", 0), ("b", "start", "full", 0),
        ("a", "step", "full", 0, True), ("b", "step", "full", 0, True),
        ("a", "step", "full", 1, True), ("b", "step", "full", 1, True),
        ("a", "end", "full", True), ("b", "end", "full", True),
    ]
    _, metrics, _ = run.reporter.stage_ends[0]
    assert metrics["seen_a"] == 7.0 and metrics["seen_b"] == 8.0


def test_nan_guard_stops_a_diverging_stage(monkeypatch, session_cache):
    monkeypatch.setenv("FLUXTUNE_CACHE", str(session_cache))
    with pytest.raises(FloatingPointError, match=r"stage 'full' cycle 0 step 2: loss .* exceeds max_loss 1e-09"):
        ft.run_tiny("""
            callbacks: [{type: nan_guard, every: 2, max_loss: 1.0e-9}]
            stages: [{name: full, type: full, steps: 5}]
        """)


def test_search_include_merges_a_registered_fragment_and_checks_it():
    from fluxtune.config.load import load_search_text

    class Spaces:
        @fluxtune.hookimpl
        def register_search_spaces(self, register):
            register("lr", lambda p: {"stages.full.optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}})
            register("broken", lambda p: {"stages.full.steps": {"type": "int", "low": 1}})

    text = "name: s\nbase:\n  stages: [{name: full, type: full, steps: 2}]\nsearch:\n  include: [{names}]\n"
    with ft.registered_plugin(Spaces(), name="spaces") as components:
        spec, _ = load_search_text(text.replace("{names}", "lr"), components)
        assert spec.search.space["stages.full.optimizer.lr"].high == 1e-3
        with pytest.raises(InputError) as error:
            load_search_text(text.replace("{names}", "lr, broken, lrr"), components)
    messages = [(p.key, p.message) for p in error.value.problems]
    assert ("search.include[1]", "search space 'broken' of plugin 'spaces' (<in-process> 0): stages.full.steps: "
            "Field required") in messages
    assert any(k == "search.include[2]" and "did you mean 'lr'?" in m for k, m in messages)


def test_register_commands_adds_a_cli_command_and_plugins_lists_it():
    import typer

    from fluxtune.cli.plugins import describe
    from fluxtune.plugins import plugin_manager

    class Hello:
        @fluxtune.hookimpl
        def register_commands(self, cli):
            @cli.command("hello")
            def hello(name: str) -> None:
                typer.echo(f"hello {name}")

    with ft.registered_plugin(Hello(), name="hello-plugin"):
        app = typer.Typer()

        @app.command()
        def other() -> None: ...

        plugin_manager()[0].hook.register_commands(cli=app)
        result = CliRunner().invoke(app, ["hello", "plugins"])
        [record] = [r for r in describe(include_builtins=False) if r["name"] == "hello-plugin"]
    assert result.exit_code == 0 and result.output == "hello plugins\n"
    assert record["commands"] == ["hello"] and record["distribution"] == "<in-process>"


def test_plugins_command_lists_builtins_only_with_all():
    from fluxtune.cli.main import app

    class Replacer:
        @fluxtune.hookimpl
        def register_timestep_samplers(self, register):
            register("uniform", lambda p: None, doc="t ~ U[0, 1] (shaped [n])", replace=True)

    with ft.registered_plugin(LossPlugin(), name="scaler"), ft.registered_plugin(Replacer(), name="replacer"):
        plain = CliRunner().invoke(app, ["plugins"])
        full = CliRunner().invoke(app, ["plugins", "--all", "--json"])
    assert plain.exit_code == 0 and "scaler (<in-process> 0)" in plain.output
    assert ("timestep_sampler uniform: t ~ U[0, 1] (shaped [n]) (replaces 'fluxtune.default_plugins.timesteps' "
            "(fluxtune 0.1.0))") in plain.output  # brackets in docs are text, not console markup
    assert "loss scaled_mse: MSE times a factor" in plain.output
    assert "(built-in)" not in plain.output and "stage full" not in plain.output
    import json

    records = {r["name"]: r for r in json.loads(full.output)}
    assert records["fluxtune.default_plugins.stages"]["registers"]["stage"][0]["name"] == "full"
    assert records["fluxtune.default_plugins.stages"]["builtin"] is True
    assert records["scaler"]["registers"] == {"loss": [{"name": "scaled_mse", "doc": "MSE times a factor"}]}
