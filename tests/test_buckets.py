"""Aspect-ratio buckets: the assignment arithmetic, a latent cache of mixed-aspect images built with Ray Data (the
shared builds of tests/built_caches.py), and training on it, streamed, with every batch drawn from a single bucket."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fluxtune.data.buckets import (
    auto_buckets,
    bucket_histogram,
    check_buckets,
    cover_crop_box,
    nearest_bucket,
    resolve_buckets,
)
from built_caches import read_all, write_mixed_dataset
from fluxtune.data.latent_cache import Preprocessing, cache_key, cache_rows
from fluxtune.data.selection import select_rows

TINY = {"preset": "tiny-fill", "seed": 0}
AUTO_64 = tuple(auto_buckets(64))


# -- the arithmetic ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [64, 256, 512, 1024])
def test_auto_buckets_are_multiples_of_16_near_the_area_and_symmetric(resolution):
    buckets = auto_buckets(resolution)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / resolution**2 - 1) <= 0.25
        assert 0.5 <= width / height <= 2.0
        assert (height, width) in buckets  # every landscape size has its portrait twin
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    check_buckets(buckets, resolution)  # auto passes the checks an explicit list gets


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    assert AUTO_64 == ((48, 96), (48, 80), (64, 64), (80, 48), (96, 48))
    assert nearest_bucket((96, 64), AUTO_64) == (80, 48)  # 1.5 is nearer 5:3 than 1:1 or 2:1 (in log ratio)
    assert nearest_bucket((64, 96), AUTO_64) == (48, 80)
    assert nearest_bucket((640, 640), AUTO_64) == (64, 64)
    assert nearest_bucket((300, 50), AUTO_64) == (96, 48)  # wider than any bucket: the widest
    assert nearest_bucket((60, 64), [(64, 48), (48, 64)]) == (48, 64)
    # equally far in log ratio from 2:1 and 1:2: the earlier bucket, everywhere
    assert nearest_bucket((64, 64), [(96, 48), (48, 96)]) == (96, 48)
    assert bucket_histogram([(96, 64), (96, 64), (64, 96)], AUTO_64) == {
        (48, 96): 0, (48, 80): 1, (64, 64): 0, (80, 48): 2, (96, 48): 0}


@pytest.mark.parametrize("size,bucket", [((96, 64), (80, 48)), ((64, 96), (48, 80)), ((100, 60), (64, 64)),
                                         ((64, 64), (96, 48))])
def test_the_crop_box_covers_the_bucket_centred_inside_the_image(size, bucket):
    left, top, right, bottom = cover_crop_box(size, bucket)
    assert math.isclose((right - left) / (bottom - top), bucket[0] / bucket[1])
    assert 0 <= left and 0 <= top and right <= size[0] + 1e-9 and bottom <= size[1] + 1e-9
    assert math.isclose(left, size[0] - right) and math.isclose(top, size[1] - bottom)  # centred
    assert math.isclose(right - left, size[0]) or math.isclose(bottom - top, size[1])  # one side kept whole


@pytest.mark.parametrize("buckets,message", [
    ([[80, 40]], "multiples of 16"),
    ([[256, 256]], "away from resolution²"),
    ([[64, 64], [64, 64]], "listed twice"),
    ([[64]], r"\[width, height\]"),
    ([], "at least one"),
    ("square", "'auto' or a list"),
])
def test_explicit_buckets_are_checked(buckets, message):
    with pytest.raises(ValueError, match=message):
        resolve_buckets(buckets, 64)


def test_config_rejects_bad_buckets_at_the_yaml_key(tmp_path):
    from fluxtune.config.errors import InputError
    from fluxtune.config.load import load_search_file

    spec = tmp_path / "run.yaml"
    spec.write_text("name: b\nbase:\n  data: {resolution: 64, buckets: [[80, 40]]}\n"
                    "  stages: [{name: full, type: full, steps: 1}]\n")
    with pytest.raises(InputError) as caught:
        load_search_file(str(spec))
    assert "base.data.buckets" in str(caught.value) and "multiples of 16" in str(caught.value)
    assert f"{spec}:3:" in str(caught.value)


def test_buckets_off_keeps_the_preprocessing_identity_and_on_changes_the_key(tmp_path):
    assert Preprocessing(64).identity() == {"resolution": 64, "mask_threshold": 0.5, "crop": "centre-square",
                                            "dtype": "float16"}
    jsonl = write_mixed_dataset(tmp_path, 3)
    rows = cache_rows(select_rows(str(jsonl), {}))
    keys = {cache_key(rows, TINY, Preprocessing(64, buckets=b)) for b in (None, AUTO_64, AUTO_64[1:])}
    assert len(keys) == 3  # off, auto, and another bucket list: three caches


# -- mixed-aspect data through Ray Data into the latent cache -------------------------------------------------

@pytest.fixture(scope="module")
def mixed(built_caches):
    """The mixed-aspect dataset and its bucketed cache (auto buckets, 64 px, float16), from the shared builds."""
    return built_caches.jsonl, built_caches.cache("auto")


def test_cache_rows_carry_their_bucket_and_hold_what_encoding_in_memory_gives(mixed):
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.flux.encoded import BucketedSet, encoded_from_columns
    from fluxtune.worker_setup import encode_arrays, load_bundle

    jsonl, cache = mixed
    assert cache.manifest["preprocessing"]["buckets"] == [list(b) for b in AUTO_64]
    read = read_all(cache)
    rows = read["rows"]
    sizes = list(zip(rows["width"].tolist(), rows["height"].tolist()))
    expected = [[(80, 48), (48, 80), (64, 64)][i % 3] for i in range(24)]  # 96x64 → 80x48, 64x96 → 48x80
    assert sizes == expected
    for (width, height), x0, cond in zip(sizes, rows["x0"], rows["cond"]):
        assert x0.shape == ((height // 16) * (width // 16), 64) and cond.shape == (x0.shape[0], 320)

    cached = encoded_from_columns(**read, resolution=64)
    assert isinstance(cached, BucketedSet) and [len(b) for b in cached.buckets] == [8, 8, 8]
    bundle = load_bundle(TINY)
    all_rows = read_rows(jsonl)
    for k, bucket in enumerate(cached.buckets):
        own = all_rows[k::3]  # this bucket's rows, in file order
        examples = [load_example(r, 64, buckets=AUTO_64) for r in own]
        arrays = {name: np.stack([e[name] for e in examples]) for name in ("image", "mask", "target")}
        arrays["prompt"] = np.array([r.prompt or "" for r in own], dtype=object)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the encoder actor (1 CPU): a convolution's float sums depend on the thread count
        try:
            direct = encode_arrays(bundle, arrays)
        finally:
            torch.set_num_threads(threads)
        got, want = bucket.batch(torch.arange(8)), direct.batch(torch.arange(8))
        for key in ("x0", "cond", "prompt_embeds", "pooled"):  # stored as float16: exactly the rounded values
            assert torch.equal(got[key], want[key].half().float()), (k, key)
        assert torch.equal(got["img_ids"], want["img_ids"])  # the bucket's own token grid


def test_training_on_mixed_aspects_draws_single_bucket_batches_and_learns(mixed):
    from fluxtune.components import loaded_components
    from fluxtune.context import evaluate
    from fluxtune.cycle import run_cycle
    from fluxtune.testing import RecordingReporter, tiny_experiment
    from fluxtune.train.datasets import trial_data
    from fluxtune.worker_setup import build_worker_setup, load_bundle

    _, cache = mixed
    experiment = tiny_experiment("""
        data: {resolution: 64, buckets: auto, val_fraction: 0.25, batch_size: 4}
        eval_every: 10
        stages: [{name: full, type: full, steps: 40, optimizer: {lr: 1.0e-3}}]
    """)
    stream, val = trial_data(str(cache.path), experiment)  # what a trial's worker reads
    assert len(val.buckets) == 3

    seen: list[tuple[int, int, int]] = []

    class Recording:  # the stream, noting every batch the stage draws: (tokens, img_ids rows, grid cells)
        def to(self, device):
            return self

        def batches(self, batch_size, seed, skip=0):
            for batch in stream.batches(batch_size, seed, skip):
                seen.append((batch["x0"].shape[1], batch["img_ids"].shape[0],
                             int(batch["height"]) * int(batch["width"])))
                yield batch

    torch.manual_seed(0)
    bundle = load_bundle(experiment["model"])
    reporter = RecordingReporter()
    setup = build_worker_setup(experiment, Recording(), val, reporter, loaded_components(), torch.device("cpu"))
    before = evaluate(bundle.transformer, setup)["val_loss"]
    run_cycle(experiment, bundle.transformer, setup)

    assert len(seen) == 40 and all(tokens == ids == cells for tokens, ids, cells in seen)  # packing follows buckets
    assert {tokens for tokens, _, _ in seen} == {15, 16}  # 80x48 / 48x80 → 5·3 tokens, 64² → 16: all buckets trained
    losses = [m["loss"] for _, m in reporter.steps]
    after = reporter.stage_ends[-1][1]["val_loss"]
    assert all(math.isfinite(v) for v in losses) and after < 0.9 * before, (before, after)


def test_data_check_shows_how_many_rows_go_to_each_bucket(tmp_path, cli_env):
    from conftest import run_cli

    jsonl = write_mixed_dataset(tmp_path, 6)
    result = run_cli(["data", "check", str(jsonl), "--buckets", "auto"], cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    for line in ("bucket 80x48: 2 rows", "bucket 48x80: 2 rows", "bucket 64x64: 2 rows", "bucket 96x48: 0 rows"):
        assert line in result.stdout

    bad = run_cli(["data", "check", str(jsonl), "--buckets", "80x40,64x64"], cwd=tmp_path, env=cli_env)
    assert bad.returncode == 2 and "--buckets 80x40,64x64: bucket 0 [80, 40]" in bad.stderr
