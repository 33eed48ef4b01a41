"""Every hook is documented in docs/plugins.md (and every documented hook exists): datasette's rule."""

from __future__ import annotations

import re
from pathlib import Path

from fluxtune import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> set[str]:
    return {name for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, "fluxtune_spec")}


def documented() -> set[str]:
    return set(re.findall(r"^### (\w+)\s*$", DOCS.read_text(), flags=re.M))


def test_the_hookspecs_are_the_nine_of_the_plugin_contract():
    assert hook_names() == {"register_stages", "register_adapters", "register_losses", "register_timestep_samplers",
                            "register_callbacks", "register_search_spaces", "register_optimizers",
                            "register_commands", "validate_experiment"}


def test_every_hook_has_a_section_in_the_docs():
    missing = hook_names() - documented()
    assert not missing, f"hooks without a '### <name>' section in {DOCS}: {sorted(missing)}"


def test_every_documented_hook_exists():
    stale = {name for name in documented() if name.startswith(("register_", "validate_"))} - hook_names()
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {sorted(stale)}"


def test_every_hook_says_what_when_and_its_arguments():
    for name in hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "When:" in doc and "Arguments:" in doc, f"{name}'s docstring must say when it runs and its arguments"
