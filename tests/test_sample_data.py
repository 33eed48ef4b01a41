"""The generated sample dataset: deterministic, cached atomically, and learnable by the documented rule."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxtune.data import sample
from fluxtune.data.rows import read_rows
from fluxtune.data.sample import PALETTE, ensure_sample_dataset, write_sample_dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.float64)


# --- format and determinism ----------------------------------------------------------------------------------


def test_writes_seed_format_jsonl_with_relative_paths_and_some_prompts(tmp_path):
    jsonl = write_sample_dataset(tmp_path, n=10, resolution=32, seed=0)

    assert jsonl == tmp_path / "data.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 10
    first = records[0]
    assert set(first) == {"user_input", "output", "prompt"}
    assert first["user_input"] == {"image": "images/0000.png", "mask": "images/0000_mask.png"}
    assert first["output"] == "images/0000_target.png"
    prompted = [i for i, record in enumerate(records) if "prompt" in record]
    assert prompted == [0, 8]
    rows = read_rows(jsonl)  # passes every data check, files included
    assert [row.line for row in rows] == list(range(1, 11))


def test_same_arguments_give_identical_bytes(tmp_path):
    write_sample_dataset(tmp_path / "a", n=6, resolution=32, seed=3)
    write_sample_dataset(tmp_path / "b", n=6, resolution=32, seed=3)

    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_other_seed_gives_other_images_and_examples_do_not_depend_on_n(tmp_path):
    write_sample_dataset(tmp_path / "seed3", n=6, resolution=32, seed=3)
    write_sample_dataset(tmp_path / "seed4", n=6, resolution=32, seed=4)
    write_sample_dataset(tmp_path / "seed3_more", n=9, resolution=32, seed=3)

    seed3, seed4 = _files(tmp_path / "seed3"), _files(tmp_path / "seed4")
    assert seed3["images/0000_target.png"] != seed4["images/0000_target.png"]
    more = _files(tmp_path / "seed3_more")
    assert all(more[name] == content for name, content in seed3.items() if name.startswith("images/"))


@pytest.mark.parametrize("arguments", [{"n": 0}, {"resolution": 40}, {"resolution": 16}, {"seed": -1}])
def test_rejects_bad_arguments(tmp_path, arguments):
    with pytest.raises(ValueError):
        write_sample_dataset(tmp_path, **arguments)


# --- cache -----------------------------------------------------------------------------------------------------


def test_cache_is_written_once_and_reused(tmp_path):
    first = ensure_sample_dataset(n=4, resolution=32, seed=1, cache_dir=tmp_path)
    before = _mtimes(tmp_path)

    second = ensure_sample_dataset(n=4, resolution=32, seed=1, cache_dir=tmp_path)

    assert second == first
    assert _mtimes(tmp_path) == before  # nothing rewritten, nothing added
    assert f"v{sample.GENERATOR_VERSION}" in first.parent.name


def test_cache_key_separates_arguments(tmp_path):
    paths = {
        ensure_sample_dataset(n=4, resolution=32, seed=1, cache_dir=tmp_path),
        ensure_sample_dataset(n=5, resolution=32, seed=1, cache_dir=tmp_path),
        ensure_sample_dataset(n=4, resolution=48, seed=1, cache_dir=tmp_path),
        ensure_sample_dataset(n=4, resolution=32, seed=2, cache_dir=tmp_path),
    }
    assert len(paths) == 4


def test_cache_location_comes_from_fluxtune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXTUNE_CACHE", str(tmp_path / "cache"))

    jsonl = ensure_sample_dataset(n=2, resolution=32, seed=0)

    assert jsonl.is_relative_to(tmp_path / "cache")
    assert len(read_rows(jsonl)) == 2


def test_crash_mid_write_leaves_no_folder_behind(tmp_path, monkeypatch):
    real_write = sample.write_sample_dataset

    def write_half_then_crash(out_dir, **kwargs):
        real_write(out_dir, **kwargs)
        (Path(out_dir) / "data.jsonl").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "write_sample_dataset", write_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_sample_dataset(n=3, resolution=32, seed=0, cache_dir=tmp_path)
    assert list((tmp_path / "sample").iterdir()) == []

    monkeypatch.setattr(sample, "write_sample_dataset", real_write)
    jsonl = ensure_sample_dataset(n=3, resolution=32, seed=0, cache_dir=tmp_path)
    assert len(read_rows(jsonl)) == 3


def test_stale_staging_folder_from_a_killed_writer_is_ignored(tmp_path):
    final_name = f"v{sample.GENERATOR_VERSION}-n3-r32-s0"
    stale = tmp_path / "sample" / f".{final_name}.tmp-dead"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "0000.png").write_bytes(b"half")

    jsonl = ensure_sample_dataset(n=3, resolution=32, seed=0, cache_dir=tmp_path)

    assert jsonl.parent.name == final_name
    assert len(read_rows(jsonl)) == 3


def test_losing_a_race_to_another_writer_uses_the_winners_folder(tmp_path, monkeypatch):
    real_write = sample.write_sample_dataset
    final = tmp_path / "sample" / f"v{sample.GENERATOR_VERSION}-n2-r32-s0"

    def another_process_finishes_first(out_dir, **kwargs):
        real_write(final, **kwargs)
        return real_write(out_dir, **kwargs)

    monkeypatch.setattr(sample, "write_sample_dataset", another_process_finishes_first)
    jsonl = ensure_sample_dataset(n=2, resolution=32, seed=0, cache_dir=tmp_path)

    assert jsonl == final / "data.jsonl"
    assert [p.name for p in (tmp_path / "sample").iterdir()] == [final.name]  # staging cleaned up


# --- the learnable rule ----------------------------------------------------------------------------------------


def _predict_hole(source: np.ndarray, mask: np.ndarray, cell: int) -> np.ndarray:
    """The module docstring's rule, applied from the visible pixels only."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    size = mask.shape[0]
    grid_y, grid_x = np.mgrid[0:size, 0:size]
    band = cell // 2
    near_hole = (grid_y >= y0 - band) & (grid_y < y1 + band) & (grid_x >= x0 - band) & (grid_x < x1 + band)
    ring = near_hole & ~mask
    design = np.stack([np.ones(ring.sum()), grid_x[ring], grid_y[ring]], axis=1)
    plane, *_ = np.linalg.lstsq(design, source[ring], rcond=None)  # one plane per channel

    palette = np.array(list(PALETTE.values()), dtype=np.float64)
    visible = source[~mask]
    key_colours = [colour for colour in palette if np.all(visible == colour, axis=1).any()]
    assert len(key_colours) == 1, "exactly one palette colour is visible: the key disc"

    predicted = np.stack([np.ones(size * size), grid_x.ravel(), grid_y.ravel()], axis=1) @ plane
    predicted = predicted.reshape(size, size, 3)
    h, w = y1 - y0, x1 - x0
    side = min(h, w) // 2
    top, left = y0 + (h - side) // 2, x0 + (w - side) // 2
    predicted[top : top + side, left : left + side] = key_colours[0]
    return predicted[y0:y1, x0:x1]


@pytest.mark.parametrize("resolution", [32, 64])
def test_hole_differs_from_source_and_the_documented_rule_reproduces_it(tmp_path, resolution):
    rows = read_rows(write_sample_dataset(tmp_path, n=24, resolution=resolution, seed=7))

    for row in rows:
        source, target = _pixels(row.image), _pixels(row.output)
        mask = _pixels(row.mask) > 127
        assert set(np.unique(_pixels(row.mask))) == {0.0, 255.0}
        assert 0.05 < mask.mean() < 0.25
        assert np.array_equal(source[~mask], target[~mask])  # only the hole changes
        assert np.abs(source[mask] - target[mask]).mean() > 20  # and it really changes

        ys, xs = np.nonzero(mask)
        hole = target[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        error = np.abs(_predict_hole(source, mask, resolution // 8) - hole)
        assert error.max() <= 2.0, f"line {row.line}: rule off by {error.max()}"
