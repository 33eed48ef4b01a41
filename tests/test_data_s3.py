"""Data and latent caches on S3, against a real local S3 endpoint (moto's server over HTTP): the JSONL and images
read the way Ray Data reads them (pyarrow, endpoint from AWS_ENDPOINT_URL), the cache written manifest-last and
streamed back by trials."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
import torch

from conftest import run_cli, run_cli_here
from fluxtune.data.sample import write_sample_dataset



@pytest.fixture(scope="module")
def s3_env(s3_endpoint, tmp_path_factory):
    """The moto S3 server (conftest), a bucket holding the sample dataset, and the AWS_* variables that point
    pyarrow (here, in the CLI and in Ray workers started after this) at it."""
    client = boto3.client("s3")
    for bucket in ("data", "cache"):
        client.create_bucket(Bucket=bucket)
    local = write_sample_dataset(tmp_path_factory.mktemp("sample"), n=8, resolution=32, seed=2).parent
    for file in sorted(local.rglob("*")):
        if file.is_file():
            client.upload_file(str(file), "data", f"set/{file.relative_to(local).as_posix()}")
    yield s3_endpoint, client


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"] for item in listed)


def test_data_check_reads_the_jsonl_and_images_from_s3(s3_env, monkeypatch, capsys):
    _, client = s3_env  # its AWS_* variables are set in this process
    result = run_cli_here(["data", "check", "s3://data/set/data.jsonl", "--buckets", "auto", "--resolution", "32"],
                          monkeypatch, capsys)
    assert result.returncode == 0, result.stderr
    assert "s3://data/set/data.jsonl: 8 good rows" in result.stdout
    assert "bucket 32x32: 8 rows" in result.stdout  # sizes read from the images on S3

    client.put_object(Bucket="data", Key="set/bad.jsonl", Body=b'{"user_input": {"image": "x.png"}}\n{oops\n')
    bad = run_cli_here(["data", "check", "s3://data/set/bad.jsonl"], monkeypatch, capsys)
    assert bad.returncode == 2
    assert "s3://data/set/bad.jsonl:1: missing key 'user_input.mask'" in bad.stderr
    assert "s3://data/set/bad.jsonl:2: invalid JSON" in bad.stderr
    missing = run_cli_here(["data", "check", "s3://data/set/none.jsonl"], monkeypatch, capsys)
    assert missing.returncode == 2 and "s3://data/set/none.jsonl: file not found" in missing.stderr


def test_prepare_writes_the_cache_to_s3_manifest_last_and_trials_read_it(s3_env, cli_env, session_cache, tmp_path):
    from fluxtune.data.latent_cache import find_cache, open_cache
    from fluxtune.train.cluster import local_cpus, start_ray
    from fluxtune.train.datasets import prepare_sweep_data, trial_data

    env, client = s3_env
    # Built here (one Ray for building and reading: Ray workers inherit the AWS_* variables set above) ...
    start_ray(None, local_cpus(workers=1, cpus_per_worker=1.0, concurrent_trials=1))
    data = {"resolution": 32, "mask_threshold": 0.5, "val_jsonl": None, "cache_dir": "s3://cache/latents"}
    prepared = prepare_sweep_data("s3://data/set/data.jsonl", {"data": data, "model": {"preset": "tiny-fill"}})
    assert prepared.cache_built and prepared.rows == 8 and prepared.source.startswith("s3://cache/latents/")

    keys = _keys(client, "cache", "latents/")
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    assert len(manifests) == 1
    key = manifests[0].split("/")[1]
    manifest = json.loads(client.get_object(Bucket="cache", Key=manifests[0])["Body"].read())
    data_prefix = f"latents/{key}/{manifest['data_prefix']}/"
    assert manifest["rows"] == 8 and any(k.startswith(data_prefix + "rows/") and k.endswith(".parquet")
                                         for k in keys)
    assert data_prefix + "index.parquet" in keys  # what trials read instead of every row group
    assert not (session_cache / "latents" / key).exists()  # nothing went to the local default ($FLUXTUNE_CACHE)

    # ... found again by `fluxtune data prepare` (the key from the objects' size and mtime, nothing re-encoded) ...
    args = ["data", "prepare", "s3://data/set/data.jsonl", "--resolution", "32", "--cache-dir", "s3://cache/latents"]
    again = run_cli(args, cwd=tmp_path, env={**cli_env, **env})
    assert again.returncode == 0, again.stderr
    assert f"8 rows; latent cache s3://cache/latents/{key} (reused)" in again.stdout
    assert _keys(client, "cache", "latents/") == keys

    # ... and read by a trial's worker from S3: pyarrow's S3 filesystem, no Ray, the split at read time; two
    # workers stream disjoint halves of the training rows and hold the same validation rows.
    uri = f"s3://cache/latents/{key}"
    experiment = {"seed": 0, "model": {"preset": "tiny-fill"}, "data": {"resolution": 32, "val_fraction": 0.25}}
    shares = []
    for rank in range(2):
        stream, val = trial_data(uri, experiment, rank, 2)
        index = stream.index
        epoch = stream.plan(2, 0).epoch(0)
        shares.append(set(index.line[np.concatenate([rows for _, rows in epoch])].tolist()))
        batch = next(stream.batches(2, 0))
        assert batch["x0"].shape[1:] == (4, 64) and batch["prompt_embeds"].dtype == torch.float32
    val_lines = index.line[index.is_val].tolist()
    assert not shares[0] & shares[1] and sorted([*shares[0], *shares[1], *val_lines]) == list(range(1, 9))
    assert len(val) == len(val_lines) > 0
    assert open_cache(uri).key == key and find_cache(key, "s3://cache/latents") is not None

    # A prefix without its manifest (a build that died before the marker) is never used.
    for item in keys:
        if item.startswith(f"latents/{key}/") and not item.endswith("manifest.json"):
            client.copy_object(Bucket="cache", Key=item.replace(key, "half" + key[4:], 1),
                               CopySource={"Bucket": "cache", "Key": item})
    half = "half" + key[4:]
    assert find_cache(half, "s3://cache/latents") is None
    with pytest.raises(ValueError, match="not a complete latent cache"):
        open_cache(f"s3://cache/latents/{half}")


def test_a_prompt_table_is_shared_between_caches_on_s3_by_a_server_side_copy(s3_env):
    from fluxtune import storage
    from fluxtune.data.shared_prompts import link_files

    _, client = s3_env
    for name, body in (("part-0.parquet", b"PAR1 zero"), ("part-1.parquet", b"PAR1 one")):
        client.put_object(Bucket="cache", Key=f"shared/a/prompts/{name}", Body=body)
    link_files("s3://cache/shared/a/prompts", "s3://cache/shared/b/attempt-1/prompts")
    assert _keys(client, "cache", "shared/b/") == ["shared/b/attempt-1/prompts/part-0.parquet",
                                                    "shared/b/attempt-1/prompts/part-1.parquet"]
    assert storage.read_bytes("s3://cache/shared/b/attempt-1/prompts/part-1.parquet") == b"PAR1 one"
