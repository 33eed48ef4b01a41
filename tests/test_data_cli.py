"""`fluxtune data check|sample` as a user runs them: every problem at once with line numbers, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import run_cli


def _png(path, size=(32, 32), mode="RGB", colour=0):
    Image.new(mode, size, colour).save(path)
    return path.name


@pytest.fixture
def messy_dataset(tmp_path):
    """Line 1 good; every later line has a different problem the issue lists."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "a_mask.png", mode="L", colour=255)
    _png(tmp_path / "a_target.png")
    _png(tmp_path / "big.png", size=(48, 48))
    _png(tmp_path / "red_mask.png", colour=(255, 0, 0))
    (tmp_path / "broken.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])  # header fine, pixels cut off
    good = {"user_input": {"image": "a.png", "mask": "a_mask.png"}, "output": "a_target.png"}
    lines = [
        json.dumps(good),
        '{"user_input": {"image": "a.png", ',  # malformed JSON
        json.dumps({"user_input": {"image": "a.png"}, "output": "a_target.png"}),  # missing mask key
        json.dumps({**good, "output": "nowhere.png"}),  # file that does not exist
        json.dumps({**good, "output": "broken.png"}),  # does not decode
        json.dumps({**good, "output": "big.png"}),  # sizes disagree
        json.dumps({**good, "user_input": {"image": "a.png", "mask": "red_mask.png"}}),  # colour mask
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def test_check_reports_every_problem_with_its_line_and_exits_2(messy_dataset, cli_env, tmp_path):
    result = run_cli(["data", "check", str(messy_dataset)], cwd=tmp_path, env=cli_env)

    assert result.returncode == 2, result.stderr
    err = result.stderr
    where = str(messy_dataset)
    assert f"{where}:2: invalid JSON" in err
    assert f"{where}:3: missing key 'user_input.mask'" in err
    assert f"{where}:4: 'output' file not found" in err
    assert f"{where}:5: 'output' is not a readable image" in err
    assert f"{where}:6: sizes disagree: image 32x32, mask 32x32, output 48x48" in err
    assert f"{where}:7: 'user_input.mask' is not a usable mask" in err and "colour image" in err
    assert f"{where}:1:" not in err
    assert err.startswith("error: ") and "(and 5 more problems)" in err.splitlines()[0]


def test_check_with_skip_keeps_the_good_rows_and_lists_the_rest(messy_dataset, cli_env, tmp_path):
    result = run_cli(["data", "check", "--skip", str(messy_dataset)], cwd=tmp_path, env=cli_env)

    assert result.returncode == 0, result.stderr
    assert "1 good rows, 6 problems in skipped rows" in result.stdout.replace("\n", " ")
    assert result.stderr.count("skipped: ") == 6


def test_an_empty_file_is_an_error_even_when_skipping(tmp_path, cli_env):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = run_cli(["data", "check", "--skip", str(empty)], cwd=tmp_path, env=cli_env)
    assert result.returncode == 2
    assert f"{empty}: contains no examples" in result.stderr


def test_sample_writes_a_dataset_that_checks_clean(tmp_path, cli_env):
    out = tmp_path / "sample"
    result = run_cli(["data", "sample", "--n", "5", "--out", str(out), "--resolution", "32"], cwd=tmp_path,
                     env=cli_env)
    assert result.returncode == 0, result.stderr
    rows = (out / "data.jsonl").read_text().splitlines()
    assert len(rows) == 5 and len(list((out / "images").glob("*.png"))) == 15

    checked = run_cli(["data", "check", str(out / "data.jsonl")], cwd=tmp_path, env=cli_env)
    assert checked.returncode == 0 and "5 good rows" in checked.stdout


def test_sample_with_bad_arguments_exits_2_and_writes_nothing(tmp_path, cli_env):
    out = tmp_path / "nothing"
    result = run_cli(["data", "sample", "--n", "3", "--out", str(out), "--resolution", "40"], cwd=tmp_path,
                     env=cli_env)
    assert result.returncode == 2
    assert "resolution must be a multiple of 16" in result.stderr
    assert not out.exists()


def test_check_and_sample_never_import_torch_or_ray(messy_dataset, tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fluxtune.cli.main import app\n"
        f"CliRunner().invoke(app, ['data', 'check', {str(messy_dataset)!r}])\n"
        f"CliRunner().invoke(app, ['data', 'sample', '--n', '1', '--out', {str(tmp_path / 's')!r}])\n"
        "print(sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr
