"""Search specs: conditional spaces, searchable cycle schedules, samplers, --set overrides, stage keys, best.yaml.

All in-process with real Optuna studies and the real schema; nothing trains here except one tiny run_cycle.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fluxtune.components import loaded_components
from fluxtune.config.errors import InputError
from fluxtune.config.load import load_search_file, load_search_text, sample_experiment
from fluxtune.config.schedule import describe, plan, planned_steps
from fluxtune.config.stage_keys import stage_keys
from fluxtune.search.space import grid_size, max_total_steps, sample_configs

SEARCHES = sorted((Path(__file__).resolve().parents[1] / "searches").glob("*.yaml"))

SPEC = """\
name: t
base:
  cycles: 2
  stages:
    - {name: full, type: full, steps: 10, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 20, adapter: {type: lora, rank: 8}}
  schedule: both
  schedules:
    both: {}
    lora_only: {each: [lora]}
    full_once: {first: [full, lora], each: [lora], steps: {lora: [20, 5]}}
search:
  num_samples: 40
  sampler: {type: random, seed: 1}
  space:
    cycles: {type: int, low: 1, high: 3}
    schedule: {type: categorical, choices: [both, lora_only, full_once]}
    stages.full.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, when: {schedule: {ne: lora_only}}}
    stages.lora.adapter.dropout: {type: float, low: 0.0, high: 0.2, when: {cycles: {gt: 1}}}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text: str, overrides=()):
    with pytest.raises(InputError) as info:
        load_search_file(write(tmp_path, text), overrides=overrides)
    return info.value.problems


@pytest.mark.parametrize("path", SEARCHES, ids=lambda p: p.name)
def test_every_shipped_search_validates_and_samples(path):
    spec, base = load_search_file(path)
    assert path.read_text().startswith("# "), "each search documents itself in a header comment"
    assert spec.search is not None and spec.search.space
    for values in sample_configs(spec.search, base, 3):
        experiment = sample_experiment(base, values, loaded_components())
        assert planned_steps(experiment) > 0


def test_shipped_searches_cover_the_issue():
    names = {p.stem for p in SEARCHES}
    assert {"lora_rank", "cycle_schedule", "timestep_sampling", "full_lr"} <= names


def test_conditional_keys_are_sampled_only_when_their_condition_holds():
    spec, base = load_search_text(SPEC)
    configs = sample_configs(spec.search, base, 40)
    for values in configs:
        assert ("stages.lora.adapter.dropout" in values) == (values["cycles"] > 1)
        assert ("stages.full.optimizer.lr" in values) == (values["schedule"] != "lora_only")
    assert {v["schedule"] for v in configs} == {"both", "lora_only", "full_once"}


def test_a_condition_on_a_later_key_is_located(tmp_path):
    text = SPEC.replace("when: {cycles: {gt: 1}}", "when: {cycles: {gt: 1}, stages.lora.steps: {gt: 2}}")
    text = text.replace("  space:\n", "  space:\n    stages.lora.adapter.rank: {type: int, low: 2, high: 8, "
                                       "when: {stages.lora.adapter.dropout: {gt: 0}}}\n")
    [p] = problems(tmp_path, text)
    assert p.key == "search.space.stages.lora.adapter.rank.when.stages.lora.adapter.dropout"
    assert "move it above" in p.message and p.line == 16  # the line of the later-sampled key's `when`


def test_bad_distributions_are_reported_together(tmp_path):
    text = SPEC.replace("low: 1.0e-4, high: 1.0e-2, log: true", "low: 0.0, high: 1.0e-2, log: true")
    text = text.replace("{type: int, low: 1, high: 3}", "{type: int, low: 3, high: 1}")
    found = {p.key: p.message for p in problems(tmp_path, text)}
    assert "needs low > 0" in found["search.space.stages.full.optimizer.lr"]
    assert "must not exceed high" in found["search.space.cycles"]


def test_schedule_shapes_decide_which_stages_run_in_each_cycle():
    _, base = load_search_text(SPEC)
    shapes = {name: sample_experiment(base, {"schedule": name, "cycles": 3}, loaded_components())
              for name in ("both", "lora_only", "full_once")}
    assert describe(shapes["both"]) == "full(10) → lora(20) | full(10) → lora(20) | full(10) → lora(20)"
    assert describe(shapes["lora_only"]) == "lora(20) | lora(20) | lora(20)"
    assert describe(shapes["full_once"]) == "full(10) → lora(20) | lora(5) | lora(5)"
    assert planned_steps(shapes["full_once"]) == 40
    # per-cycle steps are searchable by list index
    custom = sample_experiment(base, {"schedule": "full_once", "schedules.full_once.steps.lora.1": 7}, loaded_components())
    assert [s["steps"] for _, _, s in plan(custom)] == [10, 20, 7]


def test_a_schedule_naming_an_unknown_stage_is_located(tmp_path):
    [p] = problems(tmp_path, SPEC.replace("each: [lora]}", "each: [lroa]}"))
    assert p.key == "base.schedules.lora_only.each[0]" and "no stage named 'lroa'" in p.message
    assert p.line == 10


def test_asha_max_t_covers_the_longest_schedule():
    spec, base = load_search_text(SPEC)
    assert max_total_steps(base, spec.search.space) == 3 * 30  # `both` × 3 cycles


def test_grid_sampler_enumerates_the_grid_once():
    text = SPEC.replace("{type: random, seed: 1}", "{type: grid}").replace("num_samples: 40", "num_samples: 6")
    text = text.split("    stages.full.optimizer.lr")[0]  # cycles × schedule only
    spec, base = load_search_text(text)
    assert grid_size(spec.search) == 9
    seen = [tuple(sorted(v.items())) for v in sample_configs(spec.search, base, 9)]
    assert len(set(seen)) == 9


def test_grid_refuses_a_continuous_key():
    spec, _ = load_search_text(SPEC.replace("{type: random, seed: 1}", "{type: grid}"))
    with pytest.raises(InputError) as info:
        grid_size(spec.search)
    assert {p.key for p in info.value.problems} == {"search.space.stages.full.optimizer.lr",
                                                   "search.space.stages.lora.adapter.dropout"}


def test_cmaes_sampler_samples_the_numeric_keys():
    text = SPEC.replace("{type: random, seed: 1}", "{type: cmaes, seed: 0, startup_trials: 1}")
    spec, base = load_search_text(text)
    configs = sample_configs(spec.search, base, 3)
    assert all(1 <= c["cycles"] <= 3 for c in configs)


def test_switching_a_component_type_drops_the_old_params():
    spec, base = load_search_file(Path(__file__).resolve().parents[1] / "searches" / "timestep_sampling.yaml")
    uniform = sample_experiment(base, {"timesteps.type": "uniform"}, loaded_components())
    assert uniform["timesteps"] == {"type": "uniform"}
    narrow = sample_experiment(base, {"timesteps.type": "logit_normal", "timesteps.std": 0.5}, loaded_components())
    assert narrow["timesteps"]["std"] == 0.5


def test_set_overrides_change_the_file_and_are_located(tmp_path):
    path = write(tmp_path, SPEC)
    spec, base = load_search_file(path, overrides=["base.stages.lora.steps=3", "search.num_samples=2",
                                                   "search.space.cycles.high=5", "base.seed=7"])
    assert base["stages"][1]["steps"] == 3 and base["seed"] == 7
    assert spec.search.num_samples == 2 and spec.search.space["cycles"].high == 5
    found = problems(tmp_path, SPEC, overrides=["base.cycles=0", "base.colour=red"])
    assert sorted(p.one_line() for p in found) == [
        "--set base.colour=red: base.colour: unknown key",
        "--set base.cycles=0: base.cycles: Input should be greater than or equal to 1"]
    [bad] = problems(tmp_path, SPEC, overrides=["nonsense"])
    assert bad.one_line() == "--set nonsense: expected KEY.PATH=VALUE"


def test_stage_keys_share_the_unchanged_prefix_only():
    _, base = load_search_text(SPEC)
    data, plugins = {"jsonl": "x"}, {"p": "1"}

    def keys(values):
        return [k["key"] for k in stage_keys(sample_experiment(base, values, loaded_components()), data, plugins)]

    rank4, rank16 = keys({"stages.lora.adapter.rank": 4}), keys({"stages.lora.adapter.rank": 16})
    assert rank4[0] == rank16[0]  # the full stage of cycle 0 is the same work
    assert rank4[1] != rank16[1]
    assert keys({"cycles": 1}) == rank4[:0] + keys({"cycles": 1})  # deterministic
    assert keys({"cycles": 1})[:2] == keys({"cycles": 3})[:2] == keys({})[:2]  # later cycles don't matter
    assert keys({"stages.full.optimizer.lr": 5e-3})[0] != rank4[0]
    assert keys({"seed": 1})[0] != rank4[0]
    assert [k["key"] for k in stage_keys(base, {"jsonl": "y"}, plugins)][0] != keys({})[0]


def test_best_yaml_is_a_runnable_experiment(tmp_path):
    from fluxtune.search.best import write_best_yaml

    spec, base = load_search_text(SPEC)
    best = sample_experiment(base, {"schedule": "full_once", "cycles": 3}, loaded_components())
    path = write_best_yaml(tmp_path / "best.yaml", spec, best, "t-1", "abc", "val_loss", 0.25)
    again, again_base = load_search_file(path)
    assert again.search is None and again.name == "t-best"
    assert again_base == best
    assert path.read_text().startswith("# The best configuration of sweep t-1: trial abc, val_loss=0.25")


def test_run_cycle_follows_the_schedule(sample_jsonl):
    import numpy as np
    import torch

    from fluxtune.cycle import run_cycle
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.worker_setup import build_worker_setup, encode_arrays, load_bundle

    class Stages:
        def __init__(self):
            self.ends = []

        def log(self, step, metrics):
            pass

        def evaluation(self, step, metrics):
            pass

        def stage_end(self, step, metrics, checkpoint_dir):
            self.ends.append((metrics["cycle"], metrics["stage"], step))

    _, base = load_search_text(SPEC)
    experiment = sample_experiment(base, {"schedule": "full_once", "cycles": 3, "stages.full.steps": 2,
                                          "schedules.full_once.steps.lora.0": 3,
                                          "schedules.full_once.steps.lora.1": 1}, loaded_components())
    rows = read_rows(sample_jsonl)[:12]
    examples = [load_example(r, 64) for r in rows]
    arrays = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    arrays["prompt"] = np.array([""] * len(rows), dtype=object)
    bundle = load_bundle(experiment["model"])
    train = encode_arrays(bundle, {k: v[:8] for k, v in arrays.items()})
    val = encode_arrays(bundle, {k: v[8:] for k, v in arrays.items()})
    reporter = Stages()
    setup = build_worker_setup(experiment, train, val, reporter, loaded_components(), torch.device("cpu"))
    run_cycle(experiment, bundle.transformer, setup)
    assert reporter.ends == [(0, "full", 2), (0, "lora", 5), (1, "lora", 6), (2, "lora", 7)]


def test_resume_and_more_find_the_right_sweep_and_refuse_a_changed_space(tmp_path):
    from fluxtune.search.sweep_file import SweepFile, fingerprint

    spec, base = load_search_text(SPEC)
    fp = fingerprint(spec, base)
    done = SweepFile.new(tmp_path, "t", fp)
    done.status, done.tune_runs, done.created = "finished", ["tune"], 1.0
    done.save()
    with pytest.raises(InputError) as info:
        SweepFile.to_continue(tmp_path, "t", finished=False, fp=fp, spec_file="s.yaml")
    assert "no unfinished sweep named 't'" in info.value.problems[0].message and "use --more N" in str(info.value)
    assert SweepFile.to_continue(tmp_path, "t", finished=True, fp=fp, spec_file="s.yaml").sweep_id == done.sweep_id
    more_samples, _ = load_search_text(SPEC.replace("num_samples: 40", "num_samples: 80"))
    assert fingerprint(more_samples, base) == fp  # the sample count may change between runs
    changed, changed_base = load_search_text(SPEC.replace("high: 0.2", "high: 0.3"))
    with pytest.raises(InputError) as info:
        SweepFile.to_continue(tmp_path, "t", finished=True, fp=fingerprint(changed, changed_base), spec_file="s.yaml")
    assert info.value.problems[0].key == "search" and "changed" in info.value.problems[0].message
