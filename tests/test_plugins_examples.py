"""Each example package's own test suite passes against the pip-installed package (not the source tree)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO
from test_plugins_packages import EXAMPLES


def test_example_packages_own_tests_pass_when_installed(examples_site, cli_env, tmp_path):
    # One interpreter for the three suites (imports once); one torch thread: the suite shares 2 cores.
    env = {**cli_env, "PYTHONPATH": str(examples_site), "OMP_NUM_THREADS": "1"}
    suites = [str(REPO / "plugins" / name / "tests") for name in EXAMPLES]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *suites],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.findall(r"^PASSED .*?plugins/([\w-]+)/tests/", result.stdout, flags=re.M)
    assert {name: passed.count(name) for name in EXAMPLES} == {"fluxtune-ema": 3, "fluxtune-dora": 5,
                                                                "fluxtune-masked-l1": 4}
    assert "SKIPPED" not in result.stdout
    # the packages under test came from the pip install, not from plugins/<name>/src
    modules = [name.replace("-", "_") for name in EXAMPLES]
    where = subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}; "
                            f"print(*[m.__file__ for m in ({', '.join(modules)})], sep='\\n')"],
                           env=env, capture_output=True, text=True)
    files = where.stdout.split()
    assert len(files) == 3 and all(f.startswith(str(examples_site)) for f in files), where.stdout + where.stderr
