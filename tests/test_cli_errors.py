"""The CLI's error boundary: an unexpected error is one line naming what failed and the file holding its
traceback (exit 1); `--debug` prints the traceback instead; a command line that does not parse is one line (exit 2);
`--version` answers; a broken plugin is named (exit 2) but leaves `--help` working."""

from __future__ import annotations

import re
import sys
import types

import pytest

import fluxtune
from fluxtune.config.errors import InputError


def run(args, monkeypatch, capsys) -> tuple[int, str, str]:
    from fluxtune.cli.main import main

    monkeypatch.setattr(sys, "argv", ["fluxtune", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text("name: x\nbase: {stages: [{name: a, type: full, steps: 1}]}\n")
    return tmp_path


@pytest.fixture(autouse=True)
def preflight_imported():
    """Modules that bind `load_search_file` at import are imported before a test replaces it, so the stand-in
    never outlives the test inside them (later test modules would meet it)."""
    import fluxtune.cli.preflight  # noqa: F401


def explode(*args, **kwargs):
    raise ZeroDivisionError("the planner divided by zero for token hf_abcdefghijklmnopqrstuvwxyz012345")


def test_an_unexpected_error_is_one_line_and_its_traceback_is_kept(home, monkeypatch, capsys):
    monkeypatch.setattr("fluxtune.config.load.load_search_file", explode)

    code, out, err = run(["validate", "spec.yaml"], monkeypatch, capsys)

    assert code == 1 and out == ""
    [line] = err.splitlines()
    match = re.fullmatch(r"error: fluxtune validate failed at fluxtune/cli/main\.py:\d+: ZeroDivisionError: "
                         r"the planner divided by zero for token \*\*\* \(full traceback: (.+)\)", line)
    assert match, line
    kept = match.group(1)
    assert kept.startswith(str(home / "cache" / "errors")) and kept.endswith("-validate.txt")
    text = open(kept).read()
    assert text.startswith("Traceback (most recent call last):") and "in explode" in text
    assert "hf_abcdef" not in text  # secrets are redacted in the kept file too


def test_debug_prints_the_traceback_instead(home, monkeypatch, capsys):
    monkeypatch.setattr("fluxtune.config.load.load_search_file", explode)

    code, _, err = run(["--debug", "validate", "spec.yaml"], monkeypatch, capsys)

    assert code == 1
    assert err.startswith("Traceback (most recent call last):") and err.rstrip().endswith(
        "ZeroDivisionError: the planner divided by zero for token ***")
    assert not (home / "cache" / "errors").exists()


def test_inside_a_sweep_the_traceback_goes_to_the_sweep_folder(home, monkeypatch, capsys):
    from fluxtune.failures import keep_errors_in

    monkeypatch.setattr("fluxtune.config.load.load_search_file", explode)
    keep_errors_in(home / "runs" / "x" / "x-1")
    try:
        code, _, err = run(["validate", "spec.yaml"], monkeypatch, capsys)
    finally:
        keep_errors_in(None)
    assert code == 1 and f"(full traceback: {home / 'runs' / 'x' / 'x-1' / 'errors'}/" in err


def test_version(monkeypatch, capsys):
    code, out, _ = run(["--version"], monkeypatch, capsys)
    assert (code, out) == (0, f"fluxtune {fluxtune.__version__}\n")


@pytest.mark.parametrize("args, message", [
    (["search"], "error: Missing argument 'spec'. (see `fluxtune search --help`)"),
    (["serach", "x.yaml"], "error: No such command 'serach'. Did you mean 'search'? (see `fluxtune --help`)"),
    (["data", "check", "x.jsonl", "--resolution", "big"], "error: Invalid value for '--resolution': "),
])
def test_a_command_line_that_does_not_parse_is_one_line(args, message, home, monkeypatch, capsys):
    code, _, err = run(args, monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err


def test_a_broken_plugin_is_named_but_help_still_answers(home, monkeypatch, capsys):
    def broken():
        raise InputError.single("plugin 'broken' (fluxtune-broken 1.0)", "failed to import fluxtune_broken: "
                                "ModuleNotFoundError: No module named 'torch_nightly'")
    monkeypatch.setattr("fluxtune.plugins.plugin_manager", broken)

    code, out, err = run(["--help"], monkeypatch, capsys)
    assert code == 0 and "Usage: fluxtune" in out
    assert err.startswith("warning: plugin 'broken' (fluxtune-broken 1.0): failed to import")

    assert run(["--version"], monkeypatch, capsys)[0] == 0
    code, _, err = run(["validate", "spec.yaml"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: plugin 'broken'") and len(err.splitlines()) == 1


def test_a_plugin_whose_register_commands_raises_is_named(home, monkeypatch, capsys):
    from fluxtune.testing import registered_plugin

    plugin = types.ModuleType("cmd_plugin")

    @fluxtune.hookimpl
    def register_commands(cli):
        raise AttributeError("'Typer' object has no attribute 'add_command'")

    plugin.register_commands = register_commands
    with registered_plugin(plugin, name="cmdplug"):
        code, _, err = run(["validate", "spec.yaml"], monkeypatch, capsys)
        assert code == 2, err
        assert err.splitlines() == ["error: plugin 'cmdplug': register_commands failed: AttributeError: 'Typer' "
                                    "object has no attribute 'add_command'; disable it with "
                                    "FLUXTUNE_DISABLE_PLUGINS=cmdplug"]
        assert run(["--help"], monkeypatch, capsys)[0] == 0


def test_input_errors_are_bounded(home, monkeypatch, capsys):
    keys = "".join(f"  colour{i}: red\n" for i in range(100))
    (home / "spec.yaml").write_text(f"name: x\nbase:\n{keys}  stages: [{{name: a, type: full, steps: 1}}]\n")

    code, _, err = run(["validate", "spec.yaml"], monkeypatch, capsys)

    lines = err.splitlines()
    assert code == 2 and len([line for line in lines if line.startswith("error: ")]) == 21
    assert lines[-1] == "error: … and 80 more problems"
