"""A real local Ray cluster on 127.0.0.1: a head (``ray start --head``) and N-1 worker nodes
(``ray start --address``), each a separate raylet with its own node id, object store and CPUs.

Every node is started with ``--block``: the launcher stays in the foreground as the leader of its own
process group, owns that node's processes (GCS and dashboard on the head; raylet, agents, workers
everywhere) and tears them down on SIGTERM, so stopping it by pid stops exactly that node (never
``ray stop``, which kills every Ray on the machine).

Node ``i`` carries one unit of the custom resource ``headbench_node_<i>``: nodes that share an IP are
told apart by it (and a task can be pinned to a node by asking for it).

Run as ``python -m infra.ray_cluster start --address=... --block ...`` this module is ``ray start`` for a
worker node on this host (see ``_ray_start_on_loopback``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.errors import HeadbenchError
from infra.stack import BIN, HOST, free_port, stop_group

# Ray maps 127.0.0.1 to the machine's routable address unless told this is a single-host setup; this is
# Ray's own switch for that (named for desktop OSes), and keeps every Ray socket on the loopback interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
# Node launchers: no SIGTERM drain. It exists so Ray Serve can quiesce proxies; headbench runs no Serve, and
# a drain would hold `down` for 30 s on a head that hosts Train's helper actors.
NODE_ENV = LOOPBACK_ENV | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
NODE_RESOURCE = "headbench_node_{}"  # one unit on node i (0 = head)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies
WORKER_PORTS = 64  # Ray worker processes per node listen in a range of this width


def free_port_range(width: int = WORKER_PORTS, taken: set[int] | None = None) -> int:
    """Start of ``width`` consecutive free ports (for Ray's worker port range), clear of ``taken``."""
    taken = taken or set()
    for _ in range(50):
        start = free_port()
        if start + width >= 65000 or taken & set(range(start, start + width)):
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


class PortPicker:
    """Free ports for several Ray nodes on one host: each pick is distinct from every other pick and from
    every worker-port range (Ray refuses overlaps, and two nodes must never race for one port)."""

    def __init__(self, reserved: set[int] | None = None) -> None:
        self.taken: set[int] = set(reserved or ())

    def port(self) -> int:
        while (candidate := free_port()) in self.taken:
            pass
        self.taken.add(candidate)
        return candidate

    def worker_range(self) -> tuple[int, int]:
        start = free_port_range(taken=self.taken)
        self.taken |= set(range(start, start + WORKER_PORTS))
        return start, start + WORKER_PORTS - 1


def _node_flags(index: int, cpus: int, ports: PortPicker) -> list[str]:
    """Flags every node takes: its IP, CPUs, marker resource and every port it listens on."""
    low, high = ports.worker_range()
    return [f"--node-ip-address={HOST}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps({NODE_RESOURCE.format(index): 1})}",
            f"--node-manager-port={ports.port()}", f"--object-manager-port={ports.port()}",
            f"--dashboard-agent-listen-port={ports.port()}", f"--dashboard-agent-grpc-port={ports.port()}",
            f"--runtime-env-agent-port={ports.port()}", f"--metrics-export-port={ports.port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}", "--block", "--disable-usage-stats"]


def head_argv(gcs: int, dashboard: int, cpus: int, temp_dir: Path, ports: PortPicker) -> list[str]:
    """``ray start --head`` on 127.0.0.1 with every port set (GCS = what RAY_ADDRESS holds)."""
    ports.taken |= {gcs, dashboard}
    return [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true",
            f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={ports.port()}", f"--temp-dir={temp_dir}", *_node_flags(0, cpus, ports)]


def node_argv(address: str, index: int, cpus: int, ports: PortPicker) -> list[str]:
    """``ray start --address`` for worker node ``index`` (>= 1) of the cluster whose GCS is ``address``."""
    return [sys.executable, "-m", "infra.ray_cluster", "start", f"--address={address}",
            *_node_flags(index, cpus, ports)]


def node_env() -> dict[str, str]:
    """Environment of a node launcher: no foreign RAY_ADDRESS, Ray kept on loopback."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | NODE_ENV


def alive_nodes(dashboard_url: str, timeout: float = 3.0) -> dict[int, str]:
    """{node index: node id} of the ALIVE nodes carrying a ``headbench_node_<i>`` resource, read from the
    dashboard's state API ({} while it does not answer)."""
    import urllib.error
    import urllib.request

    url = f"{dashboard_url}/api/v0/nodes?limit=1000&detail=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            rows = json.loads(resp.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return {}
    found, prefix = {}, NODE_RESOURCE.format("")
    for row in rows:
        if row.get("state") != "ALIVE":
            continue
        for name in row.get("resources_total", {}):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                found[int(name[len(prefix):])] = row["node_id"]
    return found


@dataclass
class RayCluster:
    """Node launchers (head first), the GCS address (what RAY_ADDRESS holds) and the dashboard URL."""

    processes: list[subprocess.Popen[bytes]]
    address: str
    dashboard_url: str
    temp_dir: Path  # Ray's session directory, with every node's logs
    logs: list[Path] = field(default_factory=list)

    def node_ids(self) -> dict[int, str]:
        return alive_nodes(self.dashboard_url)

    def stop(self, timeout: float = 30.0) -> None:
        for proc in reversed(self.processes):  # worker nodes before the head that holds the GCS
            stop_group(proc.pid, timeout, leader_first=True)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _launch(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=node_env(), start_new_session=True)


def _wait(ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float,
          what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise HeadbenchError(f"{what}: a Ray node exited during start-up; see {log}")
        if ready():
            return
        time.sleep(1)
    raise HeadbenchError(f"{what} not ready after {timeout:.0f} s; see {logs[0].parent}")


def start_ray_cluster(cpus: list[int], log_dir: Path, timeout: float = 120.0) -> RayCluster:
    """Start a head with ``cpus[0]`` CPUs and one worker node per further entry, on 127.0.0.1, and wait
    until every node is ALIVE in the GCS."""
    if not cpus or any(c < 0 for c in cpus):
        raise HeadbenchError(f"Ray nodes need a CPU count each (>= 0); got {cpus}")
    ports = PortPicker()
    gcs, dashboard = ports.port(), ports.port()
    temp_dir = Path(tempfile.mkdtemp(prefix="hbray", dir="/tmp"))  # short: Ray's unix sockets live here
    log_dir.mkdir(parents=True, exist_ok=True)
    address, dashboard_url = f"{HOST}:{gcs}", f"http://{HOST}:{dashboard}"
    cluster = RayCluster([], address, dashboard_url, temp_dir)
    try:
        cluster.logs.append(log_dir / f"ray-head-{gcs}.log")
        cluster.processes.append(_launch(head_argv(gcs, dashboard, cpus[0], temp_dir, ports), cluster.logs[0]))
        _wait(lambda: 0 in alive_nodes(dashboard_url), cluster.processes, cluster.logs, timeout,
              f"ray head at {address}")
        for index, count in enumerate(cpus[1:], start=1):
            cluster.logs.append(log_dir / f"ray-node-{index}-{gcs}.log")
            cluster.processes.append(_launch(node_argv(address, index, count, ports), cluster.logs[-1]))
        _wait(lambda: len(alive_nodes(dashboard_url)) == len(cpus), cluster.processes, cluster.logs, timeout,
              f"ray cluster at {address} ({len(cpus)} nodes)")
    except BaseException:
        cluster.stop(timeout=15)
        raise
    return cluster


def _ray_start_on_loopback(argv: list[str]) -> None:
    """``ray start`` for a worker node on this host, every socket on 127.0.0.1.

    Ray's CLI refuses worker nodes while its loopback switch is on (a guard meant for desktop OSes), yet
    with the switch off it rewrites 127.0.0.1 to the machine's routable address and the node's servers
    listen on all interfaces. So the CLI runs unchanged with the switch on everywhere except in the CLI's
    own guard, which sees a copy of Ray's constants with multi-node allowed.
    """
    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    guard = types.SimpleNamespace(**{k: getattr(constants, k) for k in dir(constants) if not k.startswith("__")})
    guard.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = guard  # type: ignore[attr-defined]
    sys.argv = ["ray", *argv]
    scripts.main()


if __name__ == "__main__":
    os.environ.update(LOOPBACK_ENV)  # before ray is imported: it reads the switch once
    _ray_start_on_loopback(sys.argv[1:])
