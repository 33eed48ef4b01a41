"""The latent cache: built once with Ray Data (the shared builds of tests/built_caches.py), what in-memory encoding
gives (to float16 rounding), keyed by content, never used half-written; trials read it without Ray."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtune.data.latent_cache import (
    Preprocessing,
    build_cache,
    cache_key,
    cache_rows,
    ensure_cache,
    find_cache,
)
from fluxtune.data.sample import write_sample_dataset
from fluxtune.data.selection import select_rows

TINY = {"preset": "tiny-fill", "seed": 0}
PREP = Preprocessing(resolution=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small sample dataset for the cache key (hashing only: nothing is encoded)."""
    return write_sample_dataset(tmp_path_factory.mktemp("data"), n=12, resolution=32, seed=1)


@pytest.fixture(scope="module")
def built(built_caches):
    """The shared builds (tests/built_caches.py) and their centre-square cache."""
    return built_caches, built_caches.cache(None)


def test_cache_holds_what_encoding_in_memory_gives_rounded_to_float16(built):
    from built_caches import RESOLUTION, ROWS, read_all
    from fluxtune.data.images import load_example
    from fluxtune.data.rows import read_rows
    from fluxtune.flux.encoded import encoded_from_columns
    from fluxtune.worker_setup import encode_arrays, load_bundle

    shared, cache = built
    assert shared.square.cache_built and cache.manifest["rows"] == ROWS and cache.manifest["dtype"] == "float16"
    assert cache.manifest["preprocessing"]["crop"] == "centre-square"
    cached = encoded_from_columns(**read_all(cache), resolution=RESOLUTION)

    rows = read_rows(shared.jsonl)  # file order, as the cached set is
    examples = [load_example(r, RESOLUTION) for r in rows]
    arrays = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "target")}
    arrays["prompt"] = np.array([r.prompt or "" for r in rows], dtype=object)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the encoder actor (1 CPU): a convolution's float sums depend on the thread count
    try:
        direct = encode_arrays(load_bundle(TINY), arrays)
    finally:
        torch.set_num_threads(threads)

    everything = torch.arange(ROWS)
    got, want = cached.batch(everything), direct.batch(everything)
    assert set(got) == set(want)
    for key in want:  # stored as float16, read back as float32: exactly the rounded values
        expected = want[key].half().float() if want[key].is_floating_point() else want[key]
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], expected), key
    assert torch.equal(got["mask"], want["mask"])  # 0/1: no rounding at all
    assert 0 < sum(r.prompt is not None for r in rows) < ROWS  # prompts and the empty prompt both went through


def test_cache_files_are_plain_parquet_in_small_row_groups(built):
    import pyarrow.parquet as pq

    from built_caches import ROWS
    from fluxtune.data.cache_format import ROW_GROUP_ROWS

    _, cache = built
    files = sorted((cache.path / "rows").glob("*.parquet"))
    groups = [g for f in files for g in (pq.ParquetFile(f).metadata.row_group(i).num_rows
                                         for i in range(pq.ParquetFile(f).metadata.num_row_groups))]
    assert sum(groups) == ROWS and max(groups) <= ROW_GROUP_ROWS < ROWS
    assert pq.read_table(cache.path / "index.parquet").num_rows == ROWS  # the light columns, for trials
    schema = pq.read_schema(files[0])  # raw bytes + how to read them: no Ray tensor extension types
    for name, width in (("x0", 64), ("cond", 320)):
        assert str(schema.field(name).type) == "binary"
        assert schema.field(name).metadata == {b"dtype": b"float16", b"shape": f"[-1, {width}]".encode()}


def test_second_request_reuses_the_cache_without_encoding(built, monkeypatch):
    import fluxtune.data.latent_cache as latent_cache
    from built_caches import RESOLUTION

    shared, cache = built
    monkeypatch.setattr(latent_cache, "build_cache", lambda *a, **k: pytest.fail("encoded again"))
    rows = cache_rows(select_rows(str(shared.jsonl), {}))
    again, built_now = ensure_cache(rows, TINY, Preprocessing(resolution=RESOLUTION), shared.home)
    assert not built_now and again.path == cache.path


def test_key_follows_content_not_location_or_mtime(dataset, tmp_path):
    rows = cache_rows(select_rows(str(dataset), {}))
    key = cache_key(rows, TINY, PREP)

    copy = tmp_path / "copy"
    shutil.copytree(dataset.parent, copy)
    assert cache_key(cache_rows(select_rows(str(copy / "data.jsonl"), {})), TINY, PREP) == key

    target = copy / "images" / "0003_target.png"
    os.utime(target, (1, 1))  # touched, same bytes
    assert cache_key(cache_rows(select_rows(str(copy / "data.jsonl"), {})), TINY, PREP) == key

    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)  # one pixel edited in place
    assert cache_key(cache_rows(select_rows(str(copy / "data.jsonl"), {})), TINY, PREP) != key


@pytest.mark.parametrize("change", ["resolution", "threshold", "model seed", "one row fewer", "prompt"])
def test_key_changes_with_everything_that_changes_the_tensors(dataset, change):
    rows = cache_rows(select_rows(str(dataset), {}))
    key = cache_key(rows, TINY, PREP)
    model, prep = TINY, PREP
    if change == "resolution":
        prep = Preprocessing(resolution=48)
    elif change == "threshold":
        prep = Preprocessing(resolution=32, mask_threshold=0.25)
    elif change == "model seed":
        model = {**TINY, "seed": 1}
    elif change == "one row fewer":
        rows = rows[:-1]
    else:
        from dataclasses import replace

        rows = [replace(rows[0], prompt="something else"), *rows[1:]]
    assert cache_key(rows, model, prep) != key


def test_a_folder_without_manifest_is_never_used(built, tmp_path):
    _, cache = built
    half = tmp_path / cache.key
    shutil.copytree(cache.path, half)
    (half / "manifest.json").unlink()
    assert find_cache(cache.key, tmp_path) is None
    assert find_cache(cache.key, cache.path.parent) is not None


def test_a_crash_while_writing_leaves_nothing_under_the_final_name(dataset, tmp_path, monkeypatch):
    import fluxtune.data.latent_cache as latent_cache

    def crash(rows, model, preprocessing, key, out, prompts_from=None):  # the encoding dies after writing a part
        os.makedirs(os.path.join(out, "rows"), exist_ok=True)
        open(os.path.join(out, "rows", "part-0.parquet"), "wb").write(b"PAR1 half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(latent_cache, "_encode", crash)
    rows = cache_rows(select_rows(str(dataset), {}))
    with pytest.raises(RuntimeError, match="disk full"):
        build_cache(rows, TINY, PREP, "k" * 32, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the staging folder
    assert find_cache("k" * 32, tmp_path) is None


def test_trials_split_the_cache_like_preflight_and_refuse_another_resolution(built):
    import pyarrow.parquet as pq

    from built_caches import RESOLUTION, ROWS
    from fluxtune.data.images import split_is_validation
    from fluxtune.train.datasets import trial_data

    shared, cache = built
    experiment = {"seed": 5, "model": TINY,
                  "data": {"resolution": RESOLUTION, "val_fraction": 0.25, "mask_threshold": 0.5}}
    train, val = trial_data(str(cache.path), experiment)
    lines = train.index.line
    val_lines = lines[train.index.is_val].tolist()
    expected_val = [i + 1 for i in range(ROWS) if split_is_validation(f"images/{i:03d}_target.png", 0.25, 5)]
    assert val_lines == expected_val and 0 < len(expected_val) < ROWS and len(val) == len(expected_val)
    assert sorted([*lines[train.index.training_rows()].tolist(), *val_lines]) == list(range(1, ROWS + 1))
    prompts = {r.prompt for r in select_rows(str(shared.jsonl), {}).rows if r.prompt}
    assert sorted(pq.read_table(cache.prompts_dir).column("prompt").to_pylist()) == ["", *sorted(prompts)]

    with pytest.raises(ValueError, match="resolution 64 \\(wanted 32\\).*matches none of them"):
        trial_data(str(cache.path), {**experiment, "data": {**experiment["data"], "resolution": 32}})


def test_a_sweep_searching_data_keys_gets_one_cache_per_choice_and_each_trial_reads_its_own(built):
    from built_caches import RESOLUTION
    from fluxtune.train.datasets import prepare_sweep_data, trial_data

    shared, square = built
    prepared = shared.searched  # data.buckets searched over [None, auto]
    assert prepared.caches == 2 and prepared.source.endswith(".cacheset.json") and prepared.cache_built
    assert prepared.cache_key.split(",")[0] == square.key  # the base's cache was already there: reused, not rebuilt

    for buckets, tokens in ((None, {16}), ("auto", {15, 16})):  # 64² → 16 tokens; 80x48 and 48x80 → 5·3
        experiment = {"seed": 5, "model": TINY,
                      "data": {"resolution": RESOLUTION, "buckets": buckets, "val_fraction": 0.25}}
        train, _ = trial_data(prepared.source, experiment)
        assert {next(train.batches(2, seed))["x0"].shape[1] for seed in range(8)} == tokens
    with pytest.raises(ValueError, match="did not prepare a cache for"):
        trial_data(prepared.source, {"seed": 5, "model": TINY, "data": {"resolution": 32, "val_fraction": 0.25}})
    again = prepare_sweep_data(str(shared.jsonl), shared.base, cache_dir=shared.home, space=shared.space)
    assert not again.cache_built and again.source == prepared.source  # same sweep, same set: nothing encoded

    # the prompts were encoded once: the bucketed cache's prompt files are the square cache's, hard-linked
    bucketed = shared.cache("auto")
    assert bucketed.manifest["prompts_from"] == square.key and square.manifest["prompts_from"] is None
    files = {f.name: f.stat() for f in Path(bucketed.prompts_dir).iterdir()}
    assert files and all(files[f.name].st_ino == f.stat().st_ino for f in Path(square.prompts_dir).iterdir())


def test_a_prompt_table_is_reused_only_when_it_holds_exactly_these_prompts_in_this_dtype(built):
    from fluxtune.data.latent_cache import _model_record
    from fluxtune.data.shared_prompts import reusable_prompts

    shared, square = built
    rows = cache_rows(select_rows(str(shared.jsonl), {}))
    prompts = ["", *sorted({r.prompt for r in rows if r.prompt})]
    assert len(prompts) > 2
    record = _model_record(TINY)
    assert reusable_prompts(square, record, "float16", prompts) is square
    assert reusable_prompts(square, record, "float32", prompts) is None
    assert reusable_prompts(square, _model_record({**TINY, "seed": 1}), "float16", prompts) is None  # other encoders
    assert reusable_prompts(square, record, "float16", [*prompts, "one more"]) is None
    assert reusable_prompts(square, record, "float16", ["", *reversed(prompts[1:])]) is None  # indices would differ
    assert reusable_prompts(None, record, "float16", prompts) is None


def test_searching_data_keys_as_ranges_or_the_encoder_preset_is_refused_by_validate(tmp_path):
    from fluxtune.config.errors import InputError
    from fluxtune.config.load import load_search_file

    spec = tmp_path / "search.yaml"
    spec.write_text("name: s\nbase:\n  data: {resolution: 32}\n  stages: [{name: full, type: full, steps: 1}]\n"
                    "search:\n  space:\n"
                    "    data.resolution: {type: int, low: 32, high: 64, step: 16}\n"
                    "    model.seed: {type: categorical, choices: [0, 1]}\n")
    with pytest.raises(InputError) as caught:
        load_search_file(spec)  # what `fluxtune validate` runs: no data, no Ray
    text = str(caught.value)
    assert f"{spec}:7:" in text and "search.space.data.resolution" in text and "type: categorical" in text
    assert f"{spec}:8:" in text and "search.space.model.seed" in text
