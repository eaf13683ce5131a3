"""A real local Ray cluster head (``ray start --head --block``) on 127.0.0.1 with every port set.

``--block`` keeps the launcher in the foreground: it is the leader of its own process group, owns the
GCS, raylet and dashboard processes, and tears them down when it gets SIGTERM, so stopping it by pid
stops exactly this cluster (never ``ray stop``, which kills every Ray on the machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from infra.errors import HeadbenchError
from infra.stack import BIN, HOST, free_port, stop_group

# Ray maps 127.0.0.1 to the machine's routable address unless told this is a single-host setup; this is
# Ray's own switch for that (named for desktop OSes), and keeps every Ray socket on the loopback interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def free_port_range(width: int = 64) -> int:
    """Start of ``width`` consecutive free ports (for Ray's worker port range)."""
    for _ in range(50):
        start = free_port()
        if start + width >= 65000:
            continue
        ok = True
        for port in range(start, start + width):
            with socket.socket() as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise HeadbenchError("no range of free ports found for Ray workers")


@dataclass
class RayHead:
    process: subprocess.Popen[bytes]
    address: str  # host:port of the GCS, what RAY_ADDRESS holds
    dashboard_url: str
    temp_dir: Path
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        stop_group(self.process.pid, timeout)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def start_ray_head(num_cpus: int, log_dir: Path, timeout: float = 90.0) -> RayHead:
    """Start a Ray head on 127.0.0.1 with ``num_cpus`` CPUs and wait until a driver can connect."""
    worker_start = free_port_range()
    taken = set(range(worker_start, worker_start + 64))

    def port() -> int:
        """A free port outside the worker range and distinct from the others (Ray refuses overlaps)."""
        while (candidate := free_port()) in taken:
            pass
        taken.add(candidate)
        return candidate

    gcs, dashboard = port(), port()
    temp_dir = Path(tempfile.mkdtemp(prefix="hbray", dir="/tmp"))  # short: Ray's unix sockets live here
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"ray-head-{gcs}.log"
    argv = [str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={gcs}",
            f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true", f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={port()}",
            f"--dashboard-agent-grpc-port={port()}", f"--runtime-env-agent-port={port()}",
            f"--metrics-export-port={port()}", f"--node-manager-port={port()}",
            f"--object-manager-port={port()}", f"--ray-client-server-port={port()}",
            f"--min-worker-port={worker_start}", f"--max-worker-port={worker_start + 63}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    address = f"{HOST}:{gcs}"
    head = RayHead(proc, address, f"http://{HOST}:{dashboard}", temp_dir, log)
    deadline = time.monotonic() + timeout
    probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
             "print(int(ray.cluster_resources().get('CPU', 0)))"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HeadbenchError(f"ray head exited during start-up; see {log}")
        done = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60, check=False)
        if done.returncode == 0 and done.stdout.strip().endswith(str(num_cpus)):
            return head
        time.sleep(1)
    head.stop()
    raise HeadbenchError(f"ray head at {address} not ready after {timeout:.0f} s; see {log}")
