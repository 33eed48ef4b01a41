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


def test_a_bucket_that_cannot_be_written_is_named_before_anything_runs(s3_endpoint, tmp_path, cli_env):
    from conftest import run_cli

    writable = s3_bucket(f"fluxtune-{uuid.uuid4().hex[:8]}")
    assert storage.check_writable(writable + "/sweeps") is None
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=writable[5:]).get("Contents", [])]
    assert not [k for k in keys if "write-test" in k]  # the probe is gone (pyarrow may leave the empty "sweeps/")
    missing = f"s3://fluxtune-missing-{uuid.uuid4().hex[:8]}/sweeps"
    assert storage.check_writable(missing)

    (tmp_path / "sweep.yaml").write_text(f"name: nowhere\nstorage_path: {missing}\n"
                                         "base:\n  stages: [{name: full, type: full, steps: 2}]\n")
    out = run_cli(["search", "sweep.yaml"], cwd=tmp_path, env={**cli_env, **s3_endpoint})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "sweep.yaml:2" in out.stderr and "storage_path" in out.stderr and missing in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow").exists()
