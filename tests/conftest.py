"""Shared fixtures: an isolated cache/MLflow/Ray environment per test session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLUXTUNE = Path(sys.executable).with_name("fluxtune")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist workers share the cores: each worker's torch (and the processes it starts) gets its share of
    # threads, not all of them each (set before any test module imports torch)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(autouse=True, scope="module")
def no_process_state_leaks_between_modules():
    """Each test module gets a clean process: no Ray, torch.distributed group or DeepSpeed comm left over.

    The suite runs in one interpreter; in-process Ray clusters, gloo groups and DeepSpeed's global comm
    backend would otherwise leak from one module into the next (`ray.init` twice, unregistered groups).
    """
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if "deepspeed.utils.groups" in sys.modules:
        # DeepSpeed caches the world group it first saw; a later module's new gloo group would be "not
        # registered". deepspeed.comm.destroy_process_group() does this release, but tests destroy via torch.
        sys.modules["deepspeed.utils.groups"]._release_process_group_references(None)


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run sees (the run's base temp folder, not a worker's own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One generated-sample and latent cache for the whole run, all workers together (like a user's ~/.cache,
    which concurrent sweeps share: every cache entry is written under a temporary name and renamed into place)."""
    return shared_folder(tmp_path_factory, "fluxtune-cache")


@pytest.fixture
def cli_env(session_cache, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `fluxtune` console script as a user would."""
    return subprocess.run([str(FLUXTUNE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_cli_here(args: list[str], monkeypatch, capsys, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """`fluxtune ARGS` through the console script's own entry point, in this interpreter, with `env` added to the
    environment: what `run_cli` gives, without a new process's seconds of imports."""
    from fluxtune.cli.main import main

    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["fluxtune", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fluxtune", *args], code, out, err)


def run_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`run_cli_here` as (exit code, stderr)."""
    result = run_cli_here(args, monkeypatch, capsys)
    return result.returncode, result.stderr


@pytest.fixture(scope="session")
def sample_jsonl(session_cache) -> Path:
    from fluxtune.data.sample import ensure_sample_dataset

    return ensure_sample_dataset(n=64, resolution=64, seed=0, cache_dir=session_cache)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto, server mode) on 127.0.0.1; yields the env that points clients at it.

    pyarrow (Ray's storage), boto3 and MLflow all honour AWS_ENDPOINT_URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "fluxtune-test",
           "AWS_SECRET_ACCESS_KEY": "fluxtune-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def s3_bucket(name: str) -> str:
    """Create bucket `name` on the endpoint of `s3_endpoint` (its env must be active) and return its URI."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def examples_site(tmp_path_factory) -> Path:
    """The example plugin packages of plugins/, pip-installed (not editable) into a folder used via PYTHONPATH."""
    from filelock import FileLock

    from test_plugins_packages import install_examples

    folder = shared_folder(tmp_path_factory, "plugin-examples")
    with FileLock(str(folder) + ".lock"):  # installed once per run, whichever worker asks first
        if not (folder / "installed").exists():
            install_examples(folder)
            (folder / "installed").touch()
    return folder / "site"


@pytest.fixture(scope="session")
def reference_sweep(tmp_path_factory, examples_site):
    """The one shared end-to-end sweep (see tests/reference.py); tests read what it left, never change it."""
    from reference import run_reference

    return run_reference(tmp_path_factory.mktemp("reference"), examples_site, FLUXTUNE)


@pytest.fixture(scope="session")
def asha_sweep(tmp_path_factory, session_cache):
    """A small real sweep in which ASHA stops a trial (see tests/asha.py); tests read it, or copy its store."""
    from asha import run_asha

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    return run_asha(tmp_path_factory.mktemp("asha"), FLUXTUNE, env)


@pytest.fixture(scope="session")
def two_train_workers(tmp_path_factory, sample_jsonl):
    """The one shared two-worker Ray Train run (see tests/two_workers.py): each module's records by module name."""
    from two_workers import run_two_worker_checks

    return run_two_worker_checks(tmp_path_factory.mktemp("two-workers"), sample_jsonl)


@pytest.fixture(scope="session")
def built_caches(tmp_path_factory):
    """The latent caches built for real once per run (see tests/built_caches.py)."""
    from built_caches import build_caches

    return build_caches(tmp_path_factory.mktemp("built-caches"))


# Parallel runs (pytest-xdist, `--dist loadgroup`): a test that uses one of these once-per-run fixtures runs on the
# worker that ran it, so each runs once; every other test runs with the rest of its module (module-scoped
# fixtures are set up once). The long groups are handed out first, so the workers end together.
SHARED_SWEEPS = ("reference_sweep", "asha_sweep", "two_train_workers", "built_caches")
LONG_FIRST = ("test_faults", "reference_sweep", "asha_sweep", "test_cluster", "test_faults_trial",
              # the longest groups of `make test-fast` (-m "not e2e"), longest first: short ones fill the end
              "built_caches", "two_train_workers", "test_data_s3", "test_fuzz_inputs", "test_ui_server",
              "test_plugins_examples", "test_gpu_check", "test_plan", "test_upstream_fences")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    group_of = {}
    for item in items:
        sweeps = [name for name in SHARED_SWEEPS if name in getattr(item, "fixturenames", ())]
        group_of[item.nodeid] = "+".join(sweeps) or item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    long = sorted({g for g in group_of.values() if g.split("+")[0] in rank}, key=lambda g: rank[g.split("+")[0]])
    short = list(dict.fromkeys(g for g in group_of.values() if g not in long))
    # one long group, then a short one: xdist hands a worker groups until it holds more than two tests, so a
    # one-test long group alone would pull the next long group onto the same worker
    order = [g for pair in zip(long, short) for g in pair] + short[len(long):] + long[len(short):]
    position = {g: i for i, g in enumerate(order)}
    items.sort(key=lambda item: position[group_of[item.nodeid]])  # stable: a group's tests keep their order
    if getattr(config.option, "loadgroup", False):  # set on xdist workers with --dist loadgroup
        for item in items:  # what xdist does for an `xdist_group` mark, whichever hook runs first
            item._nodeid = f"{item.nodeid}@{group_of[item.nodeid]}"


class LineReader:
    """A subprocess's output lines as they come; `wait_for` blocks until one matches (or the process ends)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, needle: str, process: subprocess.Popen, timeout: float = 300, count: int = 1) -> bool:
        """True once `count` lines hold `needle`; False when the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(needle in line for line in self.lines) < count:
                if process.poll() is not None or time.monotonic() > deadline:
                    return False
                self._changed.wait(0.5)
        return True

    def finish(self, timeout: float = 10) -> str:
        """Everything, once the stream has closed (the process ended)."""
        self._thread.join(timeout)
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)
