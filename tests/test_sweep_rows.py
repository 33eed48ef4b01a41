"""How the driver turns Tune's results into sweep-file rows, including trials cut short by Ctrl+C."""

from __future__ import annotations

from ray.tune import Result

import pickle

from fluxtune.config.load import load_search_text
from fluxtune.config.schedule import planned_steps
from fluxtune.search.rows import TrialExperiments
from fluxtune.search.rows import trial_row as _trial_row
from fluxtune.train.trial import TrialSettings

SPEC = """\
name: rows
base:
  stages:
    - {name: full, type: full, steps: 10}
    - {name: lora, type: lora, steps: 5}
search:
  space:
    stages.lora.steps: {type: int, low: 5, high: 20}
"""


def _settings(tmp_path):
    _, base = load_search_text(SPEC)
    return TrialSettings(sweep_id="s", base=base, jsonl="sample", storage_path=str(tmp_path), plugins={}), base


def test_a_trial_interrupted_before_its_first_report_gets_no_row(tmp_path):
    settings, base = _settings(tmp_path)
    never_reported = Result(metrics=None, checkpoint=None, error=None, path=str(tmp_path / "t1"))
    assert _trial_row(never_reported, "val_loss", settings, base) is None


def test_a_trial_that_failed_before_its_first_report_keeps_its_error(tmp_path):
    settings, base = _settings(tmp_path)
    failed = Result(metrics={}, checkpoint=None, error=RuntimeError("worker died"), path=str(tmp_path / "t2"))
    row = _trial_row(failed, "val_loss", settings, base)
    assert row["trial"] == "t2" and "worker died" in row["error"] and row["steps"] == 0
    assert row["planned_steps"] == 15  # the base's steps: its sampled values were never recorded


def test_a_reported_trial_row_uses_its_sampled_values(tmp_path):
    settings, base = _settings(tmp_path)
    metrics = {"trial_id": "abc", "global_step": 30, "val_loss": 0.5, "config": {"stages.lora.steps": 20}}
    row = _trial_row(Result(metrics=metrics, checkpoint=None, error=None, path=str(tmp_path / "t3")),
                     "val_loss", settings, base)
    assert row["trial"] == "abc" and row["planned_steps"] == 30 and row["val_loss"] == 0.5


def test_each_sampled_config_is_turned_into_its_experiment_once(tmp_path):
    _, base = load_search_text(SPEC)
    experiments = TrialExperiments(base)
    long = experiments({"stages.lora.steps": 20})
    assert experiments({"stages.lora.steps": 20}) is long  # the same trial asked again: no second sampling
    assert planned_steps(long) == 30 and planned_steps(experiments({"stages.lora.steps": 7})) == 17
    restored = pickle.loads(pickle.dumps(experiments))  # Tune pickles the callbacks holding it
    assert restored({"stages.lora.steps": 20}) == long and restored({"stages.lora.steps": 20}) is not long


def test_the_searcher_pickles_with_plugin_factories_that_plain_pickle_cannot_take(tmp_path):
    """Tune saves the searcher with plain pickle; a plugin may register a lambda factory (the dora example does)."""
    import types

    import fluxtune
    from fluxtune.components import loaded_components
    from fluxtune.testing import registered_plugin

    plugin = types.ModuleType("lambda_plugin")

    @fluxtune.hookimpl
    def register_losses(register):
        register("lambda_loss", lambda params: None, doc="a factory plain pickle refuses")

    plugin.register_losses = register_losses
    _, base = load_search_text(SPEC)
    with registered_plugin(plugin, name="lambdas"):
        planned = TrialExperiments(base, loaded_components()).planned_steps
        assert planned({"stages.lora.steps": 20}) == 30
        restored = pickle.loads(pickle.dumps(planned))
        assert restored({"stages.lora.steps": 7}) == 17
