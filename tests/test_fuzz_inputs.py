"""Property-based fuzzing of everything a user hands fluxtune: whatever the bytes, the CLI answers with exit code 0
or 2, never a traceback, and a bounded amount of output.

Random bytes and mutated YAML go into `fluxtune validate`, random `--set` strings onto a good file, random JSONL lines
and random image files (every Pillow mode, odd sizes, truncated, EXIF-rotated) into `fluxtune data check`. The CLI
runs in-process through the console script's entry point (a subprocess costs seconds per example). Examples are
derandomized, so CI sees the same fixed budget every run; a failure prints the example that broke it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli_here
from test_bad_inputs import GOOD, write_dataset

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=100,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_OUTPUT_LINES = 50  # 20 problems with a snippet each, and a line for the rest
MAX_OUTPUT_CHARS = 30_000


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("FLUXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    write_dataset(work)
    return work


def run(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`fluxtune ARGS` in-process: (exit code, stdout + stderr)."""
    result = run_cli_here(args, monkeypatch, capsys)
    return result.returncode, result.stdout + result.stderr


def assert_answered(code: int, output: str, args: list[str]) -> None:
    shown = f"fluxtune {' '.join(map(repr, args))} → {code}\n{output[:3000]}"
    assert code in (0, 2), shown
    assert "Traceback" not in output, shown
    assert "failed at" not in output, shown  # the boundary's line for an unexpected error
    assert len(output) <= MAX_OUTPUT_CHARS and output.count("\n") <= MAX_OUTPUT_LINES, shown


# -- the spec file ------------------------------------------------------------------------------------------------

@FUZZ
@given(raw=st.binary(max_size=4000))
def test_random_bytes_as_a_spec(raw, workdir, monkeypatch, capsys):
    (workdir / "spec.yaml").write_bytes(raw)
    args = ["validate", "spec.yaml"]
    assert_answered(*run(args, monkeypatch, capsys), args)


YAML_PIECES = [":", ": ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "!!python/name:os.system ", "<<: ",
               "|\n", ">\n", "'", '"', "#", "\n", "\n  ", "\n    ", "\t", " ", "~", "null", "true", "yes", ".inf",
               "-.inf", ".nan", "1e999", "-1", "0", "0x10", "1_000", "123456789012345678901234567890", "1.5",
               "2026-11-30", "name", "base", "stages", "steps", "type", "full", "lora", "rank", "search", "space",
               "choices", "low", "high", "log", "when", "tracking", "experiment", "alias", "../..", "/etc", "é",
               "\x85", "\u2028", "\ufeff", "\x00", "\x07"]


@st.composite
def mutated_yaml(draw) -> str:
    text = GOOD
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["insert", "delete", "replace", "duplicate-line", "drop-line"]))
        at = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(YAML_PIECES)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 12)):]
        elif kind == "replace":
            text = text[:at] + draw(st.sampled_from(YAML_PIECES)) + text[at + draw(st.integers(1, 8)):]
        else:
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, max(len(lines) - 1, 0)))
            if lines:
                lines[i:i + 1] = [lines[i], lines[i]] if kind == "duplicate-line" else []
            text = "".join(lines)
    return text


@FUZZ
@given(text=mutated_yaml())
def test_mutated_yaml_into_validate(text, workdir, monkeypatch, capsys):
    (workdir / "spec.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
    args = ["validate", "spec.yaml"]
    assert_answered(*run(args, monkeypatch, capsys), args)


KEY_PARTS = ["base", "search", "tracking", "name", "data", "jsonl", "stages", "lora", "full", "0", "1", "99",
             "adapter", "rank", "steps", "optimizer", "lr", "space", "stages.lora.adapter.rank", "choices",
             "cycles", "schedule", "each", "model", "path", "preset", "alias", "experiment", "register_as", "seed",
             "num_samples", "sampler", "type", "", " ", "-", "é", "[0]"]
VALUES = st.one_of(st.sampled_from(["", "1", "0", "-1", ".inf", ".nan", "[4, 8]", "[]", "{}", "{type: int, low: 1,"
                                    " high: 4}", "null", "true", "lora", "[1", "&a", "*a", "!!python/none ''",
                                    "99999999999999999999999", "../../x", "a\nb: 2", "{path: /nowhere}", "'x'"]),
                   st.text(max_size=40))


@FUZZ
@given(parts=st.lists(st.sampled_from(KEY_PARTS), min_size=0, max_size=6), value=VALUES,
       separator=st.sampled_from(["=", "=", "=", ":", ""]))
def test_random_set_strings(parts, value, separator, workdir, monkeypatch, capsys):
    (workdir / "spec.yaml").write_text(GOOD)
    args = ["validate", "spec.yaml", "--set", ".".join(parts) + separator + value]
    assert_answered(*run(args, monkeypatch, capsys), args)


# -- the data -----------------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@st.composite
def image_bytes(draw) -> bytes:
    """An image file as a user might have one: any Pillow mode and size, random pixels, sometimes EXIF-rotated,
    truncated, or not an image at all."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pattern = draw(st.sampled_from(["random", "zeros", "ones", "max", "binary"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = Image.new(mode, (width, height))
    shape = np.asarray(base).shape
    dtype = np.asarray(base).dtype
    if dtype == bool:
        pixels = rng.integers(0, 2, size=shape).astype(bool)
    elif np.issubdtype(dtype, np.floating):
        pixels = {"random": rng.normal(0.5, 2.0, size=shape), "zeros": np.zeros(shape), "ones": np.ones(shape),
                  "max": np.full(shape, np.inf), "binary": rng.integers(0, 2, size=shape)}[pattern].astype(dtype)
    else:
        top = np.iinfo(dtype).max
        pixels = {"random": rng.integers(0, top, size=shape, endpoint=True), "zeros": np.zeros(shape),
                  "ones": np.ones(shape), "max": np.full(shape, top),
                  "binary": rng.integers(0, 2, size=shape)}[pattern].astype(dtype)
    try:
        image = Image.fromarray(pixels, mode) if mode not in ("P", "1") else base
    except (TypeError, ValueError):
        image = base
    buffer = io.BytesIO()
    image_format = draw(st.sampled_from(["PNG", "TIFF"] + (["JPEG"] if mode in ("L", "RGB", "CMYK") else [])))
    exif = Image.Exif()
    if draw(st.booleans()):
        exif[0x0112] = draw(st.integers(0, 9))
    try:
        image.save(buffer, format=image_format, exif=exif)
    except (OSError, ValueError, KeyError):
        image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@FUZZ
@given(image=image_bytes(), mask=image_bytes(), target=image_bytes(), resolution=st.sampled_from([None, 16, 32]))
def test_random_image_files_into_data_check(image, mask, target, resolution, workdir, monkeypatch, capsys):
    for name, data in (("i.img", image), ("m.img", mask), ("t.img", target)):
        (workdir / name).write_bytes(data)
    record = {"user_input": {"image": "i.img", "mask": "m.img"}, "output": "t.img"}
    (workdir / "data.jsonl").write_text(json.dumps(record) + "\n")
    args = ["data", "check", "data.jsonl", *(["--resolution", str(resolution)] if resolution else [])]
    assert_answered(*run(args, monkeypatch, capsys), args)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
PATHS = st.sampled_from(["image.png", "mask.png", "target0.png", "missing.png", "", " ", "/", ".", "..",
                         "file:///nowhere.png", "file://image.png", "s3://bucket/x.png", "data.jsonl", "image.png\x00",
                         "/dev/null", "~/x.png", "é.png"]) | st.text(max_size=20)


@st.composite
def jsonl_line(draw) -> bytes:
    kind = draw(st.sampled_from(["row", "row", "json", "bytes", "broken-row"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80)).replace(b"\n", b" ").replace(b"\r", b" ")
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    record = {"user_input": {"image": draw(PATHS), "mask": draw(PATHS)}, "output": draw(PATHS)}
    if draw(st.booleans()):
        record["prompt"] = draw(JSON_VALUES)
    text = json.dumps(record)
    if kind == "broken-row":
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode()


@FUZZ
@given(lines=st.lists(jsonl_line(), min_size=0, max_size=30), skip=st.booleans())
def test_random_jsonl_lines_into_data_check(lines, skip, workdir, monkeypatch, capsys):
    (workdir / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    args = ["data", "check", "data.jsonl", *(["--skip"] if skip else [])]
    assert_answered(*run(args, monkeypatch, capsys), args)


def test_the_fuzzers_reach_both_answers(workdir, monkeypatch, capsys):
    """The fuzzed commands do say yes to good input: a fuzzer that only ever saw refusals would prove little."""
    (workdir / "spec.yaml").write_text(GOOD)
    assert run(["validate", "spec.yaml"], monkeypatch, capsys)[0] == 0
    assert run(["validate", "spec.yaml", "--set", "base.cycles=2"], monkeypatch, capsys)[0] == 0
    assert run(["data", "check", "data.jsonl", "--resolution", "32"], monkeypatch, capsys)[0] == 0
    assert Path("data.jsonl").exists()


NUMBERS = st.one_of(st.floats(), st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, -1, 1e-300]))
SEARCHED = ["model.guidance", "stages.lora.optimizer.lr", "stages.lora.adapter.rank", "stages.full.steps", "cycles",
            "seed", "data.mask_threshold"]


@st.composite
def distribution(draw) -> str:
    kind = draw(st.sampled_from(["float", "int", "categorical"]))
    if kind == "categorical":
        choices = draw(st.lists(NUMBERS | st.sampled_from(["a", None, True]), min_size=1, max_size=4))
        return json.dumps({"type": kind, "choices": choices}, allow_nan=True).replace("NaN", ".nan") \
            .replace("-Infinity", "-.inf").replace("Infinity", ".inf")
    low, high = sorted([draw(NUMBERS), draw(NUMBERS)], key=lambda v: (v != v, v))
    extra = {"log": draw(st.booleans())} if draw(st.booleans()) else {}
    if draw(st.integers(0, 3)) == 0:
        extra["step"] = draw(NUMBERS)
    spec = {"type": kind, "low": low, "high": high, **extra}
    return json.dumps(spec, allow_nan=True).replace("NaN", ".nan").replace("-Infinity", "-.inf") \
        .replace("Infinity", ".inf")


@FUZZ
@given(searched=st.dictionaries(st.sampled_from(SEARCHED), distribution(), min_size=1, max_size=3),
       sampler=st.sampled_from(["tpe", "random", "grid", "cmaes"]))
def test_random_search_spaces_into_a_dry_run(searched, sampler, workdir, monkeypatch, capsys):
    (workdir / "spec.yaml").write_text(GOOD)
    sets = [f"search.sampler={{type: {sampler}}}"] + [f"search.space.{k}={v}" for k, v in searched.items()]
    args = ["search", "--dry-run", "spec.yaml", *(a for s in sets for a in ("--set", s))]
    assert_answered(*run(args, monkeypatch, capsys), args)
