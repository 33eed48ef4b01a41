"""Each example package's own test suite passes against the pip-installed package (not the source tree)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from test_plugins_packages import EXAMPLES, examples_site  # noqa: F401  (module-scoped install fixture)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_package_tests_pass_when_installed(name, examples_site, cli_env, tmp_path):  # noqa: F811
    tests = REPO / "plugins" / name / "tests"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests), str(tests)],
        cwd=tmp_path, env={**cli_env, "PYTHONPATH": str(examples_site)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
    # the package under test came from the pip install, not from plugins/<name>/src
    module = name.replace("-", "_")
    where = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                           env={**cli_env, "PYTHONPATH": str(examples_site)}, capture_output=True, text=True)
    assert where.stdout.startswith(str(examples_site)), where.stdout + where.stderr
