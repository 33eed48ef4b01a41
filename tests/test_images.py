"""Loading rows into model-ready arrays, and the hash-based validation split."""

import numpy as np
import pytest
from PIL import Image

from fluxtune.data.images import load_example, load_examples_batch, split_is_validation
from fluxtune.data.rows import Row, read_rows
from fluxtune.data.sample import write_sample_dataset


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory):
    return read_rows(write_sample_dataset(tmp_path_factory.mktemp("sample"), n=4, resolution=64, seed=0))


def _row(tmp_path, image: Image.Image, mask: Image.Image, target: Image.Image | None = None) -> Row:
    image.save(tmp_path / "i.png")
    mask.save(tmp_path / "m.png")
    (target or image).save(tmp_path / "t.png")
    return Row(1, str(tmp_path / "i.png"), str(tmp_path / "m.png"), str(tmp_path / "t.png"), None)


def test_example_arrays_have_flux_shapes_ranges_and_a_binary_mask(sample_rows):
    example = load_example(sample_rows[0], 64)

    assert example["image"].shape == example["target"].shape == (3, 64, 64)
    assert example["mask"].shape == (1, 64, 64)
    assert all(array.dtype == np.float32 for array in example.values())
    for name in ("image", "target"):
        assert -1.0 <= example[name].min() and example[name].max() <= 1.0
    assert set(np.unique(example["mask"])) == {0.0, 1.0}
    assert not np.allclose(example["image"], example["target"])


def test_pixel_values_map_to_minus_one_and_one(tmp_path):
    row = _row(tmp_path, Image.new("RGB", (16, 16), (0, 255, 0)), Image.new("L", (16, 16), 255))

    example = load_example(row, 16)

    assert np.array_equal(example["image"][0], np.full((16, 16), -1.0, dtype=np.float32))
    assert np.array_equal(example["image"][1], np.full((16, 16), 1.0, dtype=np.float32))
    assert np.array_equal(example["mask"], np.ones((1, 16, 16), dtype=np.float32))


def test_downscaling_the_sample_keeps_the_mask_binary(sample_rows):
    example = load_example(sample_rows[1], 32)

    assert example["image"].shape == (3, 32, 32)
    assert set(np.unique(example["mask"])) <= {0.0, 1.0}
    assert example["mask"].sum() > 0


def test_non_square_images_are_resized_on_the_shorter_side_then_centre_cropped(tmp_path):
    # 96 wide x 64 high: red, green, blue thirds. At 32x32 the crop keeps x 16..80 of the original:
    # a quarter red, half green, a quarter blue.
    stripes = np.zeros((64, 96, 3), dtype=np.uint8)
    stripes[:, :32, 0] = stripes[:, 32:64, 1] = stripes[:, 64:, 2] = 255
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, 32:64] = 255
    row = _row(tmp_path, Image.fromarray(stripes), Image.fromarray(mask))

    example = load_example(row, 32)

    image = example["image"]
    assert np.allclose(image[:, :, 2:6].mean(axis=(1, 2)), [1, -1, -1], atol=0.05)  # red
    assert np.allclose(image[:, :, 10:22].mean(axis=(1, 2)), [-1, 1, -1], atol=0.05)  # green
    assert np.allclose(image[:, :, 26:30].mean(axis=(1, 2)), [-1, -1, 1], atol=0.05)  # blue
    expected_mask = np.zeros((1, 32, 32), dtype=np.float32)
    expected_mask[:, :, 8:24] = 1
    assert np.array_equal(example["mask"], expected_mask)


def test_tall_images_crop_vertically(tmp_path):
    tall = np.zeros((64, 32), dtype=np.uint8)
    tall[:8] = 255  # the crop keeps rows 16..48; rows 0..8 are also beyond the resampling filter's reach
    row = _row(tmp_path, Image.fromarray(tall).convert("RGB"), Image.fromarray(tall))

    example = load_example(row, 16)

    assert example["mask"].sum() == 0
    assert np.allclose(example["image"], -1.0, atol=0.01)


def test_mask_is_thresholded_at_half(tmp_path):
    gray = np.array([[100, 200]], dtype=np.uint8).repeat(16, axis=0).repeat(8, axis=1)  # 16x16: left 100, right 200
    row = _row(tmp_path, Image.new("RGB", (16, 16)), Image.fromarray(gray))

    mask = load_example(row, 16)["mask"][0]

    assert np.array_equal(mask[:, :8], np.zeros((16, 8))) and np.array_equal(mask[:, 8:], np.ones((16, 8)))


def test_colour_mask_fails_loudly(tmp_path):
    row = _row(tmp_path, Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16), (255, 0, 0)))

    with pytest.raises(ValueError, match="colour image"):
        load_example(row, 16)


@pytest.mark.parametrize("resolution", [0, 24, 63, -16])
def test_resolution_must_be_a_multiple_of_16(sample_rows, resolution):
    with pytest.raises(ValueError, match="multiple of 16"):
        load_example(sample_rows[0], resolution)


def test_batch_loader_stacks_arrays_for_ray_data_map_batches(sample_rows):
    batch = {
        "image": np.array([row.image for row in sample_rows], dtype=object),
        "mask": np.array([row.mask for row in sample_rows], dtype=object),
        "output": np.array([row.output for row in sample_rows], dtype=object),
        "prompt": np.array([row.prompt for row in sample_rows], dtype=object),
    }

    loaded = load_examples_batch(batch, 32)

    assert set(loaded) == {"image", "mask", "target", "prompt"}
    assert loaded["image"].shape == loaded["target"].shape == (4, 3, 32, 32)
    assert loaded["mask"].shape == (4, 1, 32, 32)
    assert np.array_equal(loaded["target"][2], load_example(sample_rows[2], 32)["target"])
    assert list(loaded["prompt"]) == [row.prompt for row in sample_rows]


def test_batch_loader_accepts_lists_and_empty_batches(sample_rows):
    loaded = load_examples_batch({"image": [sample_rows[0].image], "mask": [sample_rows[0].mask],
                                  "output": [sample_rows[0].output]}, 16)
    assert loaded["mask"].shape == (1, 1, 16, 16)

    empty = load_examples_batch({"image": [], "mask": [], "output": []}, 16)
    assert empty["image"].shape == (0, 3, 16, 16) and empty["mask"].shape == (0, 1, 16, 16)


# --- pixels read as their author meant them --------------------------------------------------------------------


def test_a_16_bit_grey_image_keeps_its_grey_level(tmp_path):
    grey16 = Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16))  # 46 % grey, stored as 16 bits (mode I;16)
    assert grey16.mode == "I;16"
    row = _row(tmp_path, grey16, Image.new("L", (16, 16), 255))

    image = load_example(row, 16)["image"]

    assert np.allclose(image, 30000 / 65535 * 2 - 1, atol=1 / 127.5)  # not clipped to white (+1)


@pytest.mark.parametrize("dtype, one", [(np.uint8, 1), (np.uint16, 1)], ids=["8-bit", "16-bit"])
def test_a_mask_of_zeros_and_ones_marks_its_ones(tmp_path, dtype, one):
    labels = np.zeros((16, 16), dtype=dtype)
    labels[4:12, 4:12] = one  # a label map: 1 = inpaint (on screen: nearly black)
    row = _row(tmp_path, Image.new("RGB", (16, 16)), Image.fromarray(labels))

    mask = load_example(row, 16)["mask"][0]

    assert np.array_equal(mask, (labels == 1).astype(np.float32))


def test_a_mask_drawn_only_in_alpha_marks_its_transparent_hole(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black everywhere: the hole exists only as transparency
    rgba[..., 3] = 255
    rgba[4:12, 2:6, 3] = 0
    row = _row(tmp_path, Image.new("RGB", (16, 16)), Image.fromarray(rgba, "RGBA"))

    mask = load_example(row, 16)["mask"][0]

    expected = np.zeros((16, 16), dtype=np.float32)
    expected[4:12, 2:6] = 1
    assert np.array_equal(mask, expected)


def test_alpha_is_ignored_when_the_colour_draws_the_mask(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, 8:, :3] = 255  # white right half = inpaint
    rgba[..., 3] = np.arange(16, dtype=np.uint8)[None, :] * 16  # a fade in alpha that means nothing here
    row = _row(tmp_path, Image.new("RGB", (16, 16)), Image.fromarray(rgba, "RGBA"))

    mask = load_example(row, 16)["mask"][0]

    assert mask[:, :8].sum() == 0 and mask[:, 8:].all()


def _exif_rotated(pixels: np.ndarray, orientation: int) -> tuple[Image.Image, bytes]:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    return image, exif.tobytes()


def test_exif_orientation_is_applied_to_image_mask_and_target(tmp_path):
    # A phone stores a tall 16x32 picture sideways (32x16) with orientation 6: "rotate 90° clockwise to view".
    upright = np.zeros((32, 16, 3), dtype=np.uint8)
    upright[:16] = (255, 0, 0)  # red top half, as the viewer sees it
    sideways = np.ascontiguousarray(np.rot90(upright, k=1))  # what the file stores
    for name in ("i", "t"):
        image, exif = _exif_rotated(sideways, 6)
        image.save(tmp_path / f"{name}.png", exif=exif)
    mask_upright = np.zeros((32, 16), dtype=np.uint8)
    mask_upright[:16] = 255  # drawn on the upright picture, saved without EXIF
    Image.fromarray(mask_upright).save(tmp_path / "m.png")
    row = Row(1, str(tmp_path / "i.png"), str(tmp_path / "m.png"), str(tmp_path / "t.png"), None)

    assert read_rows_from(tmp_path, row) == 1  # sizes agree as a viewer shows them (16x32)
    example = load_example(row, 16)  # centre square of the upright 16x32: rows 8..24

    Image.fromarray(upright).save(tmp_path / "upright.png")
    Image.fromarray(mask_upright).save(tmp_path / "mask_upright.png")
    reference = load_example(Row(1, str(tmp_path / "upright.png"), str(tmp_path / "mask_upright.png"),
                                 str(tmp_path / "upright.png"), None), 16)
    for key in ("image", "mask", "target"):
        assert np.array_equal(example[key], reference[key]), key
    assert example["mask"][0, :8].all() and not example["mask"][0, 8:].any()  # top half of the crop: the hole
    assert np.allclose(example["image"][:, :8].mean(axis=(1, 2)), [1, -1, -1])  # red on top, as seen


def read_rows_from(folder, row: Row) -> int:
    import json

    from fluxtune.data.rows import check_rows

    jsonl = folder / "rotated.jsonl"
    jsonl.write_text(json.dumps({"user_input": {"image": row.image, "mask": row.mask}, "output": row.output}) + "\n")
    rows, problems = check_rows(jsonl)
    assert problems == []
    return len(rows)


# --- validation split ----------------------------------------------------------------------------------------


def test_split_is_pinned_across_processes_and_python_runs():
    # Hard-coded: a salted hash() or a changed algorithm would silently move examples between splits.
    keys = [f"images/{i:04d}.png" for i in range(12)]
    pinned = [True, True, False, True, True, True, True, True, False, True, True, True]
    assert [split_is_validation(key, 0.5, seed=0) for key in keys] == pinned


def test_split_fraction_is_roughly_honoured_and_seed_changes_it():
    keys = [f"row-{i}" for i in range(4000)]
    seed0 = [split_is_validation(key, 0.2, seed=0) for key in keys]
    seed1 = [split_is_validation(key, 0.2, seed=1) for key in keys]

    assert 0.18 < np.mean(seed0) < 0.22
    assert seed0 != seed1
    assert seed0 == [split_is_validation(key, 0.2, seed=0) for key in keys]


def test_split_extremes_and_nesting():
    keys = [f"k{i}" for i in range(200)]
    assert not any(split_is_validation(key, 0.0, seed=0) for key in keys)
    assert all(split_is_validation(key, 1.0, seed=0) for key in keys)
    # growing the fraction only moves examples into validation, never out
    small = {key for key in keys if split_is_validation(key, 0.1, seed=0)}
    large = {key for key in keys if split_is_validation(key, 0.3, seed=0)}
    assert small <= large


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_split_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(ValueError):
        split_is_validation("k", fraction, seed=0)
