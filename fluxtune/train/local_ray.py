"""A local Ray cluster that never outlives the driver that started it, however the driver ends (SIGKILL too).

`ray.init()` makes Ray's daemons children of the driver and they die with it only one level deep
(PR_SET_PDEATHSIG): after a SIGKILLed driver the raylet's agents live on. So the driver starts a
*keeper* in a session of its own; the keeper runs `ray start --head`, and every Ray process (GCS, raylet,
agents, workers) inherits the keeper's session id. The keeper then waits on a pipe whose only writer is the
driver: the kernel closes it when the driver ends, for any reason, and the keeper kills its whole session.

The cluster gets a private `--temp-dir`, so it never becomes the machine's "current" Ray cluster that a plain
`ray.init()` elsewhere would join; the driver joins it by its exact address.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STOP = b"stop\n"  # a clean shutdown: the keeper also removes the temp dir (after a crash its logs stay)
TERM_GRACE_S = 5.0  # after a crash: SIGTERM first, so Ray's daemons flush the logs that are kept; then SIGKILL
# A clean stop removes the temp dir, logs included, and Ray's raylet and agents sit out a SIGTERM for 5 s or more:
# the command would hang that long after its last line. The driver has already disconnected (ray.shutdown).
CLEAN_GRACE_S = 0.5
# Ray Train watches the nodes of every worker group for a drain notice (spot preemption) in an actor of its own, one
# more process per trial. This cluster is one node, this machine, that nothing drains: no watcher. Set by the user
# (the variable in the environment), it stays as set.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass
class LocalRay:
    """The driver's handle: where the cluster is, which session to look for, and the keeper to stop."""

    address: str
    session: int  # the keeper's pid = the session id of every process of this cluster
    temp_dir: str
    keeper: subprocess.Popen | None = None

    def describe(self) -> dict[str, object]:
        return {"address": self.address, "session": self.session, "temp_dir": self.temp_dir}

    def stop(self, timeout: float = 60.0) -> None:
        """End the cluster now (ray.shutdown first), and wait until none of its processes is left."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.keeper is None or self.keeper.poll() is not None:
            return
        try:
            self.keeper.stdin.write(STOP)
            self.keeper.stdin.close()
        except (BrokenPipeError, ValueError):  # keeper already gone, or stop() ran twice
            pass
        self.keeper.wait(timeout=timeout)


def start_local_ray(num_cpus: int, verbose: bool = False) -> LocalRay:
    """Start the keeper (and through it the cluster); returns once the cluster accepts drivers."""
    from fluxtune.train.ray_private import enable_token_auth

    # As ray.init() does for a new local cluster; set in our environment, so the keeper's `ray start` and this
    # driver agree.
    enable_token_auth()
    temp_dir = tempfile.mkdtemp(prefix="fluxtune-ray-", dir="/tmp")  # short: Ray's unix sockets live below it
    keeper = subprocess.Popen(
        [sys.executable, "-m", "fluxtune.train.local_ray", "--num-cpus", str(num_cpus), "--temp-dir", temp_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.DEVNULL,
        start_new_session=True)  # its own session: Ctrl+C or a killed process group never reaches it first
    line = keeper.stdout.readline()
    keeper.stdout.close()
    answer = json.loads(line) if line.strip() else {"error": "the Ray keeper ended before starting Ray"}
    if "error" in answer:
        keeper.wait(timeout=60)
        raise RuntimeError(f"could not start a local Ray cluster: {answer['error']}")
    local = LocalRay(address=answer["address"], session=keeper.pid, temp_dir=temp_dir, keeper=keeper)
    atexit.register(local.stop)  # runs before Ray's own atexit shutdown (registered earlier, run later)
    return local


def session_pids(session: int) -> list[int]:
    """Every live process of a session (from /proc: field 6 of /proc/<pid>/stat), zombies excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_session(session: int, spare: int | None = None, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM every process of the session, SIGKILL what is left after `grace_s`, until none is."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        pids = [p for p in session_pids(session) if p != spare]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keep(num_cpus: int, temp_dir: str) -> int:
    """The keeper: start Ray in this session, tell the driver where, wait for the driver to end, clean up."""
    me = os.getpid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` of the keeper still cleans up
    ray_cli = Path(sys.executable).with_name("ray")
    log = Path(temp_dir) / "ray-start.log"
    clean = False
    try:
        for _ in range(3):  # another process may take the free port before the GCS binds it: try another
            port = _free_port()
            address = f"127.0.0.1:{port}"
            command = [str(ray_cli), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                       f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                       f"--temp-dir={temp_dir}"]
            with open(log, "wb") as out:  # a file, not a pipe: Ray's daemons inherit it, a pipe would never close
                started = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**LOCAL_CLUSTER_ENV, **os.environ})  # its workers inherit it
            if started.returncode == 0:
                break
            kill_session(me, spare=me)  # whatever the failed start left
        if started.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            _answer({"error": " / ".join(tail) or f"ray start exited with {started.returncode}"})
            return 1
        _answer({"address": address})
        clean = sys.stdin.buffer.read() == STOP  # EOF: the driver ended (read returns what it wrote first)
        return 0
    finally:
        kill_session(me, spare=me, grace_s=CLEAN_GRACE_S if clean else TERM_GRACE_S)
        if clean:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _answer(message: dict[str, str]) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the driver is already gone: clean up regardless
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fluxtune's local Ray keeper (started by the driver)")
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()
    sys.exit(_keep(args.num_cpus, args.temp_dir))
