"""fluxtune's small records beside Ray's checkpoints: the same calls on a local folder and on S3 (moto)."""

from __future__ import annotations

import uuid

import pytest

from conftest import s3_bucket
from fluxtune import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    request.getfixturevalue("s3_endpoint")
    return s3_bucket(f"fluxtune-{uuid.uuid4().hex[:8]}") + "/sweeps"


def test_json_records_round_trip_and_missing_ones_read_as_none(root):
    path = storage.join(root, "stage_cache", "abc.json")
    assert storage.read_json(path) is None and not storage.exists(path)
    storage.write_json(path, {"checkpoint": "x", "global_step": 3})
    assert storage.exists(path)
    assert storage.read_json(path) == {"checkpoint": "x", "global_step": 3}


def test_folders_are_listed_by_prefix_and_copied_locally(root, tmp_path):
    for name in ("checkpoint_000001", "checkpoint_000000", "other"):
        storage.write_json(storage.join(root, "run", name, "progress.json"), {"name": name})
    found = storage.list_folders(storage.join(root, "run"), "checkpoint")
    assert [f.rsplit("/", 1)[-1] for f in found] == ["checkpoint_000000", "checkpoint_000001"]
    assert storage.list_folders(storage.join(root, "nothing-here")) == []
    with storage.local_copy(found[1]) as local:
        assert (local / "progress.json").read_text().count("checkpoint_000001") == 1


def test_ray_checkpoint_paths_get_their_scheme_back():
    assert storage.qualify("bucket/sweeps/ckpt", "s3://bucket/sweeps") == "s3://bucket/sweeps/ckpt"
    assert storage.qualify("/runs/ckpt", "/runs") == "/runs/ckpt"
    assert storage.qualify("s3://b/c", "s3://b") == "s3://b/c"
