"""Data behind fsspec URIs, and the checks `fluxtune run` does before Ray starts (bad rows, skip policy)."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from fluxtune.data.images import load_triplet
from fluxtune.data.latent_cache import CacheRow, Preprocessing, cache_key
from fluxtune.data.rows import read_rows
from fluxtune.data.sample import make_example, write_sample_dataset


def _put_png(fs, path, pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    fs.pipe(path, buffer.getvalue())


def test_rows_images_and_cache_keys_work_on_fsspec_uris():
    fs = fsspec.filesystem("memory")
    source, mask, target, _ = make_example(0, 32, seed=0)
    for name, pixels in (("a.png", source), ("a_mask.png", mask), ("a_target.png", target)):
        _put_png(fs, f"/bucket/set/{name}", pixels)
    fs.pipe("/bucket/set/data.jsonl", json.dumps(
        {"user_input": {"image": "a.png", "mask": "a_mask.png"}, "output": "a_target.png"}).encode() + b"\n")

    (row,) = read_rows("memory://bucket/set/data.jsonl")
    assert row.image == "memory://bucket/set/a.png"  # relative paths resolve beside the remote JSONL

    arrays = load_triplet(row.image, row.mask, row.output, 32)
    assert np.array_equal(arrays["mask"][0], (mask >= 128).astype(np.float32))

    cache_row = CacheRow(1, row.image, row.mask, row.output, "", row.output, False)
    key = cache_key([cache_row], {"preset": "tiny-fill"}, Preprocessing(32))
    _put_png(fs, "/bucket/set/a_target.png", source)  # the object changed: the store's token changes the key
    assert cache_key([cache_row], {"preset": "tiny-fill"}, Preprocessing(32)) != key


RUN = """\
name: bad-rows
base:
  data: {{jsonl: {jsonl}, resolution: 32{extra}}}
  stages: [{{name: full, type: full, steps: 1}}]
"""


@pytest.fixture
def bad_rows_dataset(tmp_path):
    jsonl = write_sample_dataset(tmp_path / "data", n=8, resolution=32)
    lines = jsonl.read_text().splitlines()
    lines[2] = lines[2].replace("0002_target.png", "gone.png")
    lines[5] = "{not json"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def test_run_stops_on_bad_rows_with_exit_2_before_any_compute(bad_rows_dataset, tmp_path, cli_env):
    (tmp_path / "run.yaml").write_text(RUN.format(jsonl=bad_rows_dataset, extra=""))
    result = run_cli(["run", "run.yaml"], cwd=tmp_path, env=cli_env, timeout=120)

    assert result.returncode == 2, result.stderr
    assert f"{bad_rows_dataset}:3: 'output' file not found" in result.stderr
    assert f"{bad_rows_dataset}:6: invalid JSON" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow").exists()  # nothing written


def test_preflight_with_skip_keeps_good_rows_and_counts_the_rest(bad_rows_dataset, tmp_path):
    from fluxtune.cli.preflight import preflight

    spec = tmp_path / "run.yaml"
    spec.write_text(RUN.format(jsonl=bad_rows_dataset, extra=", on_bad_rows: skip, val_fraction: 0.3"))
    checked = preflight(str(spec))
    assert checked.rows == 6 and len(checked.skipped) == 2
    assert checked.skipped[0].startswith(f"{bad_rows_dataset}:3:")


def test_on_bad_rows_accepts_only_fail_or_skip(bad_rows_dataset, tmp_path, cli_env):
    (tmp_path / "run.yaml").write_text(RUN.format(jsonl=bad_rows_dataset, extra=", on_bad_rows: ignore"))
    result = run_cli(["validate", "run.yaml"], cwd=tmp_path, env=cli_env, timeout=120)
    assert result.returncode == 2
    assert "run.yaml:3:" in result.stderr and "base.data.on_bad_rows" in result.stderr
