"""A trial's configuration is resolved once into a typed, read-only ResolvedTrial; dotted paths are read by one
walker, whether they address an experiment (search paths) or the search file (`--set`)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from ruamel.yaml.comments import CommentedMap

from fluxtune.components import loaded_components
from fluxtune.config.errors import InputError
from fluxtune.config.frozen import thaw
from fluxtune.config.load import load_search_text
from fluxtune.config.paths import PathError, get_path, locate, set_path, stage_loc
from fluxtune.config.resolved import ResolvedTrial, resolve_trial
from fluxtune.config.stage_keys import stage_keys
from fluxtune.search.rows import TrialExperiments

SPEC = """\
name: resolved
base:
  cycles: 2
  stages:
    - {name: full, type: full, steps: 10}
    - {name: lora, type: lora, steps: 5, adapter: {type: lora, rank: 8, alpha: 8}}
search:
  space:
    stages.lora.adapter.rank: {type: categorical, choices: [4, 8]}
    stages.lora.steps: {type: int, low: 5, high: 20}
"""


@pytest.fixture(scope="module")
def base():
    return load_search_text(SPEC)[1]


# -- ResolvedTrial --------------------------------------------------------------------------------------------------

def test_the_sampled_values_land_in_the_experiment_and_the_base_is_untouched(base):
    trial = resolve_trial(base, {"stages.lora.adapter.rank": 4, "stages.lora.steps": 7}, loaded_components())
    assert isinstance(trial, ResolvedTrial)
    assert trial.values == {"stages.lora.adapter.rank": 4, "stages.lora.steps": 7}
    assert trial.experiment["stages"][1]["adapter"]["rank"] == 4 and trial.experiment["stages"][1]["steps"] == 7
    assert "dropout" in trial.experiment["stages"][1]["adapter"]  # the component's defaults are filled in
    assert base["stages"][1]["adapter"]["rank"] == 8 and base["stages"][1]["steps"] == 5


def test_the_schedule_and_planned_steps_follow_the_sampled_values(base):
    trial = resolve_trial(base, {"stages.lora.steps": 7}, loaded_components())
    assert [(s.cycle, s.index, s.stage["name"], s.stage["steps"]) for s in trial.schedule] == [
        (0, 0, "full", 10), (0, 1, "lora", 7), (1, 0, "full", 10), (1, 1, "lora", 7)]
    assert trial.planned_steps == 34
    assert trial.description == "full(10) → lora(7) | full(10) → lora(7)"
    assert resolve_trial(base, {}, loaded_components()).planned_steps == 30  # no values: the base itself


def test_a_schedule_with_per_cycle_steps_is_what_planned_steps_counts():
    schedule = "  cycles: 3\n  schedule: {first: [full, lora], each: [lora], steps: {lora: [5, 9]}}\n"
    _, base = load_search_text(SPEC.replace("  cycles: 2\n", schedule))
    trial = resolve_trial(base, {"stages.lora.steps": 7}, loaded_components())
    assert [(s.stage["name"], s.stage["steps"]) for s in trial.schedule] == [("full", 10), ("lora", 5), ("lora", 9),
                                                                             ("lora", 9)]
    assert trial.planned_steps == 33


def test_the_driver_and_the_trial_actor_resolve_the_same_trial(base):
    """The driver resolves from its cache, the actor from the pickled settings: they must agree to the stage keys,
    which decide which stage checkpoints trials share."""
    values = {"stages.lora.adapter.rank": 4, "stages.lora.steps": 12}
    driver = TrialExperiments(base).resolve(values)
    actor = resolve_trial(pickle.loads(pickle.dumps(base)), dict(values), loaded_components())
    assert driver == actor and driver is not actor
    assert stage_keys(driver.experiment, {"jsonl": "x"}, {}) == stage_keys(actor.experiment_dict(), {"jsonl": "x"}, {})
    assert pickle.loads(pickle.dumps(driver)) == driver  # Tune pickles what holds it
    assert resolve_trial(base, {"stages.lora.adapter.rank": 8, "stages.lora.steps": 12}, loaded_components()) != driver


def test_the_driver_resolves_each_config_once(base):
    experiments = TrialExperiments(base)
    first = experiments.resolve({"stages.lora.steps": 9})
    assert experiments.resolve({"stages.lora.steps": 9}) is first
    assert experiments({"stages.lora.steps": 9}) is first.experiment


def test_the_resolved_experiment_is_read_only_and_copies_into_a_changeable_one(base):
    trial = resolve_trial(base, {"stages.lora.steps": 7}, loaded_components())
    with pytest.raises(TypeError, match="read-only"):
        trial.experiment["cycles"] = 5
    with pytest.raises(TypeError, match="read-only"):
        trial.experiment["stages"][1]["adapter"].update(rank=2)
    with pytest.raises(TypeError, match="read-only"):
        trial.experiment["stages"].append({})
    with pytest.raises(TypeError, match="read-only"):
        trial.values["stages.lora.steps"] = 1
    for mutable in (trial.experiment_dict(), copy.deepcopy(trial.experiment), thaw(trial.experiment)):
        mutable["stages"][1]["adapter"]["rank"] = 2
        assert type(mutable) is dict and type(mutable["stages"]) is list
    assert trial.experiment["stages"][1]["adapter"]["rank"] == 8
    restored = pickle.loads(pickle.dumps(trial.experiment))
    with pytest.raises(TypeError, match="read-only"):
        restored["stages"][0]["steps"] = 1
    assert json.dumps(trial.experiment, sort_keys=True) == json.dumps(trial.experiment_dict(), sort_keys=True)


def test_a_bad_sampled_value_is_an_input_error_naming_its_path(base):
    with pytest.raises(InputError) as caught:
        resolve_trial(base, {"stages.lora.adapter.rank": -1}, loaded_components())
    [problem] = caught.value.problems
    assert problem.file == "<sampled stages.lora.adapter.rank=-1>" and problem.key == "stages[1].adapter.rank"
    assert "greater than or equal to 1" in problem.message
    with pytest.raises(InputError, match=r"<sampled stages.lora.adapter.rnk=4>: stages\[1\].adapter.rnk: unknown key"):
        resolve_trial(base, {"stages.lora.adapter.rnk": 4}, loaded_components())


# -- the dotted-path walker -----------------------------------------------------------------------------------------

TREE = {"cycles": 2,
        "stages": [{"name": "full", "steps": 10}, {"name": "lora", "steps": 5, "adapter": {"rank": 8}}],
        "schedule": {"steps": {"lora": [5, 9]}},
        "space": {"stages.lora.adapter.rank": {"choices": [4, 8]}, "stages": {"x": 1}}}


def test_list_items_are_addressed_by_name_or_index():
    assert get_path(TREE, "stages.lora.adapter.rank") == 8
    assert get_path(TREE, "stages.1.steps") == 5
    assert get_path(TREE, "schedule.steps.lora.1") == 9
    assert stage_loc(TREE, "stages.lora.adapter.rank") == ("stages", 1, "adapter", "rank")


def test_the_longest_dotted_key_is_matched_first():
    assert get_path(TREE, "space.stages.lora.adapter.rank.choices") == [4, 8]
    assert get_path(TREE, "space.stages.x") == 1  # no longer key matches: the walk goes on part by part
    assert locate(TREE, "space.stages.lora.adapter.rank.choices").loc == (
        "space", "stages.lora.adapter.rank", "choices")


def test_missing_keys_are_errors_that_say_what_is_there():
    with pytest.raises(PathError) as caught:
        get_path(TREE, "stages.lorra.steps")
    assert str(caught.value) == "stages.lorra.steps: no stage named 'lorra' (stages: full, lora)"
    assert caught.value.loc == ("stages",)
    with pytest.raises(PathError, match=r"'rnk' does not exist here \(keys: rank\)"):
        get_path(TREE, "stages.lora.adapter.rnk")
    with pytest.raises(PathError, match="no list item named '7' \\(indices 0-1\\)"):
        get_path(TREE, "schedule.steps.lora.7")
    with pytest.raises(PathError, match="cycles is a value, not a mapping"):
        get_path(TREE, "cycles.x")
    assert stage_loc(TREE, "stages.lora.adapter.rnk") == ("stages", 1, "adapter")  # as far as it exists


def test_set_path_copies_and_replaces_only_what_exists():
    changed = set_path(TREE, "stages.lora.adapter.rank", 4)
    assert changed["stages"][1]["adapter"]["rank"] == 4 and TREE["stages"][1]["adapter"]["rank"] == 8
    assert set_path(TREE, "schedule.steps.lora.0", 3)["schedule"]["steps"]["lora"] == [3, 9]
    with pytest.raises(PathError, match="cannot replace a whole stage"):
        set_path(TREE, "stages.lora", {"name": "lora"})
    with pytest.raises(PathError, match="'dropout' does not exist here"):
        set_path(TREE, "stages.lora.adapter.dropout", 0.1)
    assert set_path(TREE, "stages.lora.adapter.dropout", 0.1, new_key=True)["stages"][1]["adapter"] == {
        "rank": 8, "dropout": 0.1}
    with pytest.raises(PathError, match="'adaptr' does not exist here"):  # only the last key may be new
        set_path(TREE, "stages.lora.adaptr.dropout", 0.1, new_key=True)


def test_a_walk_that_makes_mappings_creates_the_missing_keys_and_says_where():
    tree = copy.deepcopy(TREE)
    spot = locate(tree, "stages.lora.optimizer.lr", make=CommentedMap)
    assert not spot.exists and spot.loc == ("stages", 1, "optimizer", "lr")
    assert spot.created == ("stages", 1, "optimizer")  # the first key the walk added
    assert isinstance(tree["stages"][1]["optimizer"], CommentedMap) and spot.parent is tree["stages"][1]["optimizer"]
    new_space_key = locate(tree, "space.data.resolution", make=dict, whole_rest_at=("space",))
    assert new_space_key.loc == ("space", "data.resolution") and new_space_key.created == new_space_key.loc
    existing = locate(tree, "stages.lora.steps", make=dict)
    assert existing.exists and existing.created is None
    with pytest.raises(PathError, match="no stage named 'lorra'"):  # list items are never made
        locate(tree, "stages.lorra.steps", make=dict)
