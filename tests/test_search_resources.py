"""Resources per trial are checked against the real (local) Ray cluster before any trial starts."""

from __future__ import annotations

import pytest

from fluxtune.config.errors import InputError
from fluxtune.config.load import load_search_text
from fluxtune.search.tuning import resource_corners as _resource_corners
from fluxtune.train.cluster import check_resources

SPEC = """\
name: r
base:
  cpus_per_worker: 0.5
  stages: [{name: full, type: full, steps: 2}]
search:
  space:
    workers: {type: int, low: 1, high: 2}
    gpus_per_worker: {type: categorical, choices: [0, 1]}
"""


@pytest.fixture(scope="module")
def two_cpu_ray():
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_every_corner_of_the_searched_resources_is_checked(two_cpu_ray):
    spec, base = load_search_text(SPEC)
    corners = _resource_corners(base, spec.search)
    assert sorted((c["workers"], c["gpus_per_worker"]) for c in corners) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(InputError) as info:
        check_resources(corners, "r.yaml")
    [problem] = info.value.problems  # one line per distinct problem
    assert problem.key == "base.gpus_per_worker"
    assert "the Ray cluster has 0" in problem.message and problem.file == "r.yaml"


def test_a_trial_that_fits_passes(two_cpu_ray):
    spec, base = load_search_text(SPEC.replace("[0, 1]", "[0]"))
    check_resources(_resource_corners(base, spec.search), "r.yaml")
    with pytest.raises(InputError) as info:
        check_resources(_resource_corners({**base, "cpus_per_worker": 1.5}, spec.search), "r.yaml")
    assert "a trial needs 3.01 CPUs (2 workers × 1.5); the Ray cluster has 2" in info.value.problems[0].message
