"""Reading dataset rows: paths resolved, and every problem reported at once as file:line: message."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fluxtune.data.rows import DataError, MaskRule, Row, check_rows, read_rows


def _save(path, size=(8, 8), mode="RGB", colour=0):
    Image.new(mode, size, colour).save(path)
    return path.name


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _record(image="a.png", mask="a_mask.png", output="a_target.png", **extra):
    return {"user_input": {"image": image, "mask": mask}, "output": output, **extra}


@pytest.fixture
def good_files(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "a_mask.png", mode="L", colour=255)
    _save(tmp_path / "a_target.png")
    return tmp_path


def test_reads_rows_with_paths_resolved_against_the_jsonl_folder(good_files):
    sub = good_files / "sub"
    sub.mkdir()
    _save(sub / "b.png")
    absolute_mask = str(good_files / "a_mask.png")
    jsonl = _write_jsonl(
        good_files / "data.jsonl",
        [_record(prompt="fill it"), "", _record(image="sub/b.png", mask=absolute_mask)],
    )

    rows = read_rows(jsonl)

    assert rows == [
        Row(1, str(good_files / "a.png"), absolute_mask, str(good_files / "a_target.png"), "fill it"),
        Row(3, str(good_files / "sub" / "b.png"), absolute_mask, str(good_files / "a_target.png"), None),
    ]


def test_relative_jsonl_path_still_gives_absolute_row_paths(good_files, monkeypatch):
    _write_jsonl(good_files / "data.jsonl", [_record()])
    monkeypatch.chdir(good_files)

    (row,) = read_rows("data.jsonl")

    assert os.path.isabs(row.image) and row.image == str(good_files / "a.png")


def test_every_problem_is_reported_with_its_line_all_at_once(good_files):
    d = good_files
    _save(d / "small_mask.png", size=(4, 4), mode="L")
    _save(d / "colour_mask.png", mode="RGB", colour=(255, 0, 0))
    (d / "broken.png").write_bytes(b"this is not a png")
    jsonl = _write_jsonl(
        d / "data.jsonl",
        [
            _record(),  # 1: fine
            '{"user_input": {"image": "a.png"',  # 2: malformed JSON
            "[1, 2]",  # 3: not an object
            {"user_input": {"image": "a.png", "mask": "a_mask.png"}},  # 4: missing output
            {"user_input": {"image": "a.png"}, "output": "a_target.png"},  # 5: missing mask
            {"output": "a_target.png"},  # 6: missing user_input
            {"user_input": {"image": 3, "mask": "a_mask.png"}, "output": "a_target.png"},  # 7: wrong type
            {"user_input": "a.png", "output": "a_target.png"},  # 8: user_input not an object
            _record(prompt=5),  # 9: prompt not a string
            _record(image="nope.png"),  # 10: missing file
            _record(image="broken.png"),  # 11: does not decode
            _record(mask="small_mask.png"),  # 12: sizes disagree
            _record(mask="colour_mask.png"),  # 13: colour mask
            _record(output=" "),  # 14: empty path
        ],
    )

    with pytest.raises(DataError) as caught:
        read_rows(jsonl)

    problems = caught.value.problems
    expected = {
        2: "invalid JSON",
        3: "expected a JSON object, got array",
        4: "missing key 'output'",
        5: "missing key 'user_input.mask'",
        6: "missing key 'user_input'",
        7: "'user_input.image' must be a path string, got number",
        8: "'user_input' must be an object, got string",
        9: "'prompt' must be a string, got number",
        10: "'user_input.image' file not found: " + str(d / "nope.png"),
        11: "'user_input.image' is not a readable image: " + str(d / "broken.png"),
        12: "sizes disagree: image 8x8, mask 4x4, output 8x8",
        13: "'user_input.mask' is not a usable mask",
        14: "'output' is an empty path",
    }
    for line, message in expected.items():
        prefix = f"{jsonl}:{line}: "
        assert any(p.startswith(prefix) and message in p for p in problems), (line, message, problems)
    assert not any(p.startswith(f"{jsonl}:1:") for p in problems)
    assert len(problems) == len(expected)
    assert "colour image" in next(p for p in problems if p.startswith(f"{jsonl}:13:"))


def test_error_message_starts_with_a_one_line_summary_then_lists_all(good_files):
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(), "oops", {"user_input": {}}])

    with pytest.raises(DataError) as caught:
        read_rows(jsonl)

    lines = str(caught.value).splitlines()
    assert lines[0] == f"{jsonl}:2: invalid JSON: Expecting value (column 1) (and 3 more problems)"
    assert [line.strip() for line in lines[1:]] == caught.value.problems
    assert caught.value.problems[1:] == [
        f"{jsonl}:3: missing key 'user_input.image'",
        f"{jsonl}:3: missing key 'user_input.mask'",
        f"{jsonl}:3: missing key 'output'",
    ]


def test_a_single_problem_has_no_count_suffix(tmp_path):
    with pytest.raises(DataError) as caught:
        read_rows(tmp_path / "missing.jsonl")

    assert str(caught.value) == f"{tmp_path / 'missing.jsonl'}: file not found"


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_dataset_is_an_error(tmp_path, content):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(content)

    with pytest.raises(DataError, match="contains no examples"):
        read_rows(jsonl)


def test_a_directory_is_not_a_jsonl_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_rows(tmp_path)


def test_remote_uris_are_passed_through_unchecked_but_file_uris_are_local_files(good_files):
    target = f"file://{good_files / 'a_target.png'}"
    jsonl = _write_jsonl(
        good_files / "data.jsonl",
        [_record(image="s3://bucket/a.png", mask="gs://bucket/a_mask.png", output=target),
         _record(output="file:///nowhere/t.png")],
    )

    rows, problems = check_rows(jsonl)

    assert [(row.image, row.mask, row.output) for row in rows] == [
        ("s3://bucket/a.png", "gs://bucket/a_mask.png", target)]
    assert problems == [f"{jsonl}:2: 'output' file not found: file:///nowhere/t.png"]


def test_local_files_are_still_checked_beside_uris(good_files):
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(image="s3://bucket/a.png", output="gone.png")])

    with pytest.raises(DataError, match="'output' file not found"):
        read_rows(jsonl)


def test_check_files_false_only_checks_the_json(good_files):
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(image="nope.png")])

    (row,) = read_rows(jsonl, check_files=False)

    assert row.image == str(good_files / "nope.png")


def test_check_rows_returns_good_rows_and_problems_for_skip_mode(good_files):
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(), _record(output="gone.png"), "{}", _record()])

    rows, problems = check_rows(jsonl)

    assert [row.line for row in rows] == [1, 4]
    assert [p.split(": ")[0] for p in problems] == [f"{jsonl}:2", f"{jsonl}:3", f"{jsonl}:3"]


@pytest.mark.parametrize(
    "make_mask",
    [
        lambda path: Image.new("RGB", (8, 8), (255, 255, 255)).save(path),  # RGB, channels equal
        lambda path: Image.new("RGBA", (8, 8), (250, 255, 252, 0)).save(path),  # small JPEG-like drift; alpha ignored
        lambda path: Image.new("1", (8, 8), 1).save(path),
        lambda path: Image.new("L", (8, 8), 255).convert("P").save(path),
        lambda path: Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path),  # 16-bit PNG
    ],
    ids=["rgb-gray", "rgba-near-gray", "bilevel", "palette", "16-bit"],
)
def test_grayscale_masks_in_any_mode_are_accepted(good_files, make_mask):
    make_mask(good_files / "m.png")
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(mask="m.png")])

    assert len(read_rows(jsonl)) == 1


def test_invalid_utf8_is_reported_on_its_line(good_files):
    jsonl = good_files / "data.jsonl"
    jsonl.write_bytes(json.dumps(_record()).encode() + b"\n\xff\xfe\n")

    rows, problems = check_rows(jsonl)

    assert len(rows) == 1 and problems == [f"{jsonl}:2: not valid UTF-8"]


def test_data_error_survives_pickling_between_processes():
    error = pickle.loads(pickle.dumps(DataError(["f:1: a", "f:2: b"])))

    assert error.problems == ["f:1: a", "f:2: b"]
    assert str(error).splitlines()[0] == "f:1: a (and 1 more problem)"


def test_data_error_summary_pluralises():
    assert str(DataError(["f:1: a", "f:2: b"])).splitlines()[0] == "f:1: a (and 1 more problem)"
    assert DataError(["f:1: a", "f:2: b", "f:3: c"]).problems == ["f:1: a", "f:2: b", "f:3: c"]


def test_a_mask_with_nothing_to_inpaint_is_a_bad_row(good_files):
    _save(good_files / "black.png", mode="L", colour=0)
    _save(good_files / "dim.png", mode="L", colour=120)  # below the 0.5 threshold everywhere
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record(), _record(mask="black.png"), _record(mask="dim.png")])

    rows, problems = check_rows(jsonl)

    assert [row.line for row in rows] == [1]
    assert [p.split(": ")[0] for p in problems] == [f"{jsonl}:2", f"{jsonl}:3"]
    assert all("'user_input.mask' is empty: no pixel at or above mask_threshold 0.5" in p for p in problems)
    assert len(check_rows(jsonl, masks=MaskRule(threshold=0.4))[0]) == 2  # 120/255 = 0.47 inpaints at 0.4


def test_a_mask_whose_hole_the_training_crop_cuts_away_is_a_bad_row_at_that_resolution(good_files):
    Image.new("RGB", (96, 32)).save(good_files / "wide.png")
    edge = Image.new("L", (96, 32), 0)
    edge.paste(255, (0, 0, 16, 32))  # the left edge only: the centre square (x 32..64) misses it
    edge.save(good_files / "edge.png")
    jsonl = _write_jsonl(good_files / "data.jsonl", [_record("wide.png", "edge.png", "wide.png")])

    assert check_rows(jsonl)[1] == []  # without a resolution only the whole mask counts
    _, problems = check_rows(jsonl, masks=MaskRule(resolution=32))
    assert problems == [f"{jsonl}:1: 'user_input.mask' is empty after the training crop to 32x32: its hole lies "
                        f"outside the crop or is too small: {good_files / 'edge.png'}"]
    # with aspect-ratio buckets the wide image keeps its sides, and the hole
    assert check_rows(jsonl, masks=MaskRule(resolution=32, buckets=((48, 16), (32, 32))))[1] == []
