"""`fluxtune --help` and `fluxtune validate` stay import-light: no torch, ray, diffusers or mlflow."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from fluxtune.cli.main import main
sys.argv = ["fluxtune", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted(m for m in ("torch", "ray", "diffusers", "mlflow", "optuna", "peft") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
sys.exit(code)
"""


def run(*args):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)


def test_help_imports_nothing_heavy():
    result = run("--help")
    assert result.returncode == 0 and "search" in result.stdout
    assert "HEAVY: \n" in result.stdout


def test_validate_imports_nothing_heavy():
    result = run("validate", str(REPO / "searches" / "lora_rank.yaml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "HEAVY: \n" in result.stdout
