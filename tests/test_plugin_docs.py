"""Every code example in docs/plugins.md runs: a stranger copies them, so each is executed here and what it
registers is built and, where it can be without extra packages, called.

Python examples are executed as modules in the order they appear, each with `import fluxtune` and pydantic's
`Field` available (the first example imports both; later ones are fragments of such a module)."""

from __future__ import annotations

import re
import tomllib
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fluxtune.testing as ft
from fluxtune.components import loaded_components

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
PRELUDE = "import fluxtune\nfrom pydantic import Field\n"


def examples(language: str) -> list[tuple[int, str]]:
    """(line, code) of every fenced block in `language`."""
    text = DOCS.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)]


def as_module(line: int, code: str) -> types.ModuleType:
    module = types.ModuleType(f"plugins_md_line_{line}")
    exec(PRELUDE, module.__dict__)  # noqa: S102 - our own docs
    # blank lines first, so a traceback points at the line in docs/plugins.md
    exec(compile("\n" * (line - 1) + code, str(DOCS), "exec"), module.__dict__)  # noqa: S102
    return module


def has_hooks(module: types.ModuleType) -> bool:
    return any(hasattr(value, "fluxtune_impl") for value in vars(module).values())


PYTHON = examples("python")


def test_the_docs_have_the_examples_this_test_checks():
    assert len(PYTHON) >= 6
    assert not examples("py"), "use ```python fences, so this test runs them"


def test_the_package_example_declares_an_entry_point_of_group_fluxtune():
    ((line, code),) = examples("toml")
    project = tomllib.loads(code)
    assert project["project"]["entry-points"]["fluxtune"] == {"huber": "fluxtune_huber"}


@pytest.mark.parametrize("line, code", PYTHON, ids=[f"line-{line}" for line, _ in PYTHON])
def test_every_python_example_runs(line, code):
    module = as_module(line, code)
    if not has_hooks(module):
        return
    before = {kind: set(names) for kind, names in loaded_components().entries.items()}
    with ft.registered_plugin(module, name=module.__name__) as components:
        added = [(kind, name) for kind, entries in components.entries.items() for name in entries
                 if name not in before[kind]]
        for kind, name in added:
            component = components.get(kind, name).build({})  # its params' defaults validate; the factory runs
            if kind == "loss":
                pred, target = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
                value = component(pred, target, {"mask": torch.ones(2, 16, 256), "height": torch.tensor(4),
                                                 "width": torch.tensor(4)})
                assert value.ndim == 0 and torch.isfinite(value)


def _example_defining(name: str) -> types.ModuleType:
    (found,) = [as_module(line, code) for line, code in PYTHON if re.search(rf"^def {name}\b", code, flags=re.M)]
    return found


def test_the_token_grid_example_lays_tokens_out_row_by_row():
    token_grid = _example_defining("token_grid").token_grid
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # a 2 × 3 grid, 3 channels
    grid = token_grid(tokens, {"height": torch.tensor(2), "width": torch.tensor(3)})
    assert grid.shape == (2, 3, 2, 3)
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 5])  # row 1, column 2 is token 1 · 3 + 2


def test_the_validate_experiment_example_names_the_key_and_passes_a_block_that_exists():
    hook = _example_defining("validate_experiment").validate_experiment
    tiny = {"num_layers": 1, "num_single_layers": 1}
    assert hook({"loss": {"type": "block_loss", "block": 5}}, tiny) == [
        ("loss.block", "block 5 does not exist: the model has 2 blocks")]
    assert hook({"loss": {"type": "block_loss", "block": 1}}, tiny) == []
    assert hook({"loss": {"type": "flow_matching"}}, tiny) == []


def test_the_command_example_adds_a_working_command():
    import typer

    module = _example_defining("register_commands")
    cli = typer.Typer()
    module.register_commands(cli=cli)

    @cli.callback()
    def root() -> None:  # a group, so the command is addressed by name as under `fluxtune`
        pass

    result = CliRunner().invoke(cli, ["hello", "world"])
    assert result.exit_code == 0 and result.output == "hello world\n"


def test_the_testing_example_passes():
    module = _example_defining("test_a_misspelt_key_is_refused")
    module.test_a_misspelt_key_is_refused()
