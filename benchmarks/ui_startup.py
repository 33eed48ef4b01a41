"""How long `fluxtune ui` takes until the MLflow UI answers: `mlflow server` (MLflow's CLI, which then starts
uvicorn in a second Python process) against MLflow's uvicorn app started directly (what fluxtune does), on a new
store and on one that exists, alternating so machine load hits both alike. "Up" means the same for both: the store
answers a search (fluxtune.tracking.server.READY_PATH) from the process started.

    .venv/bin/python benchmarks/ui_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fluxtune.tracking.server import start_server, stop_server


def time_start(store: Path, via_mlflow_cli: bool) -> float:
    started = time.perf_counter()
    process, _ = start_server(store, via_mlflow_cli=via_mlflow_cli)
    elapsed = time.perf_counter() - started
    stop_server(process)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for via_cli, how in ((True, "mlflow server"), (False, "uvicorn direct")):
                new = Path(scratch) / f"{how.split()[0]}-{round_}"
                times.setdefault((how, "new store"), []).append(time_start(new, via_cli))
                times.setdefault((how, "existing store"), []).append(time_start(new, via_cli))
    print("| start | store | median s | runs |")
    print("| --- | --- | ---: | --- |")
    for (how, store), values in times.items():
        print(f"| {how} | {store} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    for store in ("new store", "existing store"):
        ratio = statistics.median(times[("uvicorn direct", store)]) / statistics.median(times[("mlflow server", store)])
        print(f"{store}: direct / mlflow server = {ratio:.2f}")


if __name__ == "__main__":
    main()
