"""Search files are validated before anything runs; every problem is located at file:line:col with its key."""

import textwrap

import pytest

from fluxtune.components import loaded_components
from fluxtune.config.errors import InputError
from fluxtune.config.load import load_search_file, sample_experiment

VALID = """\
name: t
base:
  cycles: 2
  stages:
    - {name: full, type: full, steps: 4}
    - name: lora
      type: lora
      steps: 4
      adapter: {type: lora, rank: 8}
search:
  space:
    stages.lora.adapter.rank: {type: categorical, choices: [4, 8]}
"""


def problems(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(InputError) as info:
        load_search_file(path)
    return info.value.problems


def test_a_valid_file_fills_component_defaults(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    spec, base = load_search_file(path)
    lora = base["stages"][1]
    assert lora["adapter"] == {"type": "lora", "rank": 8, "alpha": 96.0, "dropout": 0.05,
                               "targets": lora["adapter"]["targets"]}
    assert "attn.to_q" in lora["adapter"]["targets"]
    assert base["loss"]["type"] == "flow_matching"
    assert spec.search.space["stages.lora.adapter.rank"].choices == [4, 8]


def test_unknown_key_is_located(tmp_path):
    [p] = problems(tmp_path, VALID.replace("  cycles: 2\n", "  cycles: 2\n  cycels: 3\n"))
    assert (p.line, p.col, p.key) == (4, 3, "base.cycels")
    assert p.message == "unknown key"
    assert p.one_line().startswith(f"{tmp_path / 'spec.yaml'}:4:3: base.cycels:")


def test_yaml_syntax_error_points_at_the_line(tmp_path):
    [p] = problems(tmp_path, "name: t\nbase:\n  stages: [\n  cycles: 2\n")
    assert p.line is not None and p.line >= 3
    assert "YAML syntax error" in p.message


def test_all_problems_are_reported_at_once(tmp_path):
    text = VALID.replace("steps: 4}", "steps: 0}").replace("  cycles: 2\n", "  cycles: -1\n  colour: red\n")
    found = {p.key: p for p in problems(tmp_path, text)}
    assert set(found) == {"base.stages[0].steps", "base.cycles", "base.colour"}
    assert found["base.stages[0].steps"].line == 6
    assert "greater than or equal to 1" in found["base.cycles"].message


def test_component_problems_name_the_plugin_key_and_suggest(tmp_path):
    text = VALID.replace("type: full,", "type: ful,").replace("rank: 8}", "rank: 8, rnak: 2}")
    found = {p.key: p for p in problems(tmp_path, text)}
    assert "did you mean 'full'?" in found["base.stages[0].type"].message
    assert found["base.stages[0].type"].line == 5
    assert found["base.stages[1].adapter.rnak"].message == "unknown key"
    assert found["base.stages[1].adapter.rnak"].line == 9


def test_search_paths_must_exist_in_the_base(tmp_path):
    text = VALID.replace("stages.lora.adapter.rank:", "stages.lora.adapter.rnk:")
    [p] = problems(tmp_path, text)
    assert p.key == "search.space.stages.lora.adapter.rnk"
    assert p.line == 12
    assert "does not exist" in p.message


def test_search_values_are_validated_by_the_component(tmp_path):
    text = VALID.replace("choices: [4, 8]", "choices: [4, -1]")
    [p] = problems(tmp_path, text)
    assert p.key == "search.space.stages.lora.adapter.rank" and "-1" in p.message


def test_sampled_values_land_at_their_paths(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    _, base = load_search_file(path)
    exp = sample_experiment(base, {"stages.lora.adapter.rank": 4, "cycles": 1}, loaded_components())
    assert exp["stages"][1]["adapter"]["rank"] == 4 and exp["cycles"] == 1
    assert base["stages"][1]["adapter"]["rank"] == 8  # the base is never modified


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        load_search_file(tmp_path / "nope.yaml")
    assert "file not found" in str(info.value)


def test_an_image_metric_needs_the_probe_at_every_evaluation():
    from fluxtune.config.load import load_search_text

    text = ("name: x\nbase:\n  sample_every: 3\n  stages: [{name: a, type: full, steps: 1}]\n"
            "search: {metric: masked_psnr, mode: max}\n")
    with pytest.raises(InputError) as info:
        load_search_text(text, path="x.yaml")
    [problem] = info.value.problems
    assert (problem.key, problem.line) == ("base.sample_every", 3) and "sample_every: 1" in problem.message
    load_search_text(text.replace("sample_every: 3", "sample_every: 1"), path="x.yaml")
    load_search_text(text.replace("metric: masked_psnr, mode: max", "metric: val_loss"), path="x.yaml")


@pytest.mark.parametrize("metric", ["val_los", "loss", "ema_decay"])
def test_a_search_metric_no_evaluation_reports_is_refused_at_its_line(metric):
    from fluxtune.config.load import load_search_text

    text = f"name: x\nbase:\n  stages: [{{name: a, type: full, steps: 1}}]\nsearch:\n  metric: {metric}\n"
    with pytest.raises(InputError) as info:
        load_search_text(text, path="x.yaml")
    [problem] = info.value.problems
    assert (problem.key, problem.line) == ("search.metric", 5)
    assert f"'{metric}' is not reported at evaluations" in problem.message and "val_loss" in problem.message


def test_deep_bracket_nesting_is_refused_before_parsing_and_quoted_or_commented_brackets_do_not_count(tmp_path):
    from fluxtune.config.yaml_source import MAX_DEPTH, parse_yaml

    deep = "name: x\nbase:\n  deep: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(InputError) as caught:
        parse_yaml(deep, "deep.yaml")
    assert str(caught.value).splitlines() == [f"deep.yaml:3:{9 + MAX_DEPTH}: nested more than {MAX_DEPTH} levels deep:"
                                              " not a search file"]
    fine = ('name: "' + "[" * 100 + '"\n# ' + "{" * 100 + "\nbase: {eval_every: 2}  # it's " + "[" * 100 + "\n"
            "prompt: it's [red]\n")
    assert parse_yaml(fine, "fine.yaml").tree["base"] == {"eval_every": 2}
    at_the_limit = "deep: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"  # with the mapping: 64
    assert parse_yaml(at_the_limit, "limit.yaml").tree["deep"] is not None
