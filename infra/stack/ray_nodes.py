"""The Ray cluster of ``headbench up --ray-nodes N``: a head (``ray start --head``) and N-1 worker nodes
(``ray start --address``), each a separate raylet with its own node id, object store and CPUs, plus a 0-CPU
driver node that the runs started on this host attach to.

Every node is started with ``--block``: the launcher stays in the foreground as the leader of its own
process group, owns that node's processes (GCS and dashboard on the head; raylet, agents, workers
everywhere) and tears them down on SIGTERM, so stopping it by pid stops exactly that node (never
``ray stop``, which kills every Ray on the machine). ``infra.stack.local.LocalStack`` supervises the launchers
with the other services; the test suite's cluster is the same stack's.

Node ``i`` carries one unit of the custom resource ``headbench_node_<i>``: nodes that share an IP are
told apart by it (and a task can be pinned to a node by asking for it).

Run as ``python -m infra.stack.ray_nodes start --address=... --block ...`` this module is ``ray start`` for a
worker node on this host, every socket on 127.0.0.1 (``infra.training.ray_private.ray_start_on_loopback``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.processes.supervise import BIN, HOST, WORKER_PORTS, free_port, free_port_range
from infra.training.cluster import LOG_MONITOR_ENV, LOOPBACK_ENV, TRAINING_ENV

# Node launchers: no SIGTERM drain. It exists so Ray Serve can quiesce proxies; headbench runs no Serve, and
# a drain would hold `down` for 30 s on a head that hosts Train's helper actors.
NODE_ENV = LOOPBACK_ENV | TRAINING_ENV | LOG_MONITOR_ENV | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
NODE_RESOURCE = "headbench_node_{}"  # one unit on node i (0 = head)
# The stack's driver node: no CPUs, so no training worker lands there; the processes that start runs on this
# host (`headbench run`, the Prefect worker's flow runs) attach to it, and Train's controller, which Ray
# puts on the driver's node, runs there too (what a Prefect worker container is on a real cluster).
DRIVER_RESOURCE = "headbench_driver"

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


def _node_flags(resource: str, cpus: int, ports: PortPicker) -> list[str]:
    """Flags every node takes: its IP, CPUs, marker resource and every port it listens on."""
    low, high = ports.worker_range()
    return [f"--node-ip-address={HOST}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps({resource: 1})}",
            f"--node-manager-port={ports.port()}", f"--object-manager-port={ports.port()}",
            f"--dashboard-agent-listen-port={ports.port()}", f"--dashboard-agent-grpc-port={ports.port()}",
            f"--runtime-env-agent-port={ports.port()}", f"--metrics-export-port={ports.port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}", "--block", "--disable-usage-stats"]


def head_argv(gcs: int, dashboard: int, cpus: int, temp_dir: Path, ports: PortPicker) -> list[str]:
    """``ray start --head`` on 127.0.0.1 with every port set (GCS = what RAY_ADDRESS holds)."""
    ports.taken |= {gcs, dashboard}
    return [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true",
            f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={ports.port()}", f"--temp-dir={temp_dir}",
            *_node_flags(NODE_RESOURCE.format(0), cpus, ports)]


def node_argv(address: str, index: int, cpus: int, ports: PortPicker) -> list[str]:
    """``ray start --address`` for worker node ``index`` (>= 1) of the cluster whose GCS is ``address``."""
    return [sys.executable, "-m", "infra.stack.ray_nodes", "start", f"--address={address}",
            *_node_flags(NODE_RESOURCE.format(index), cpus, ports)]


def driver_node_argv(address: str, temp_dir: Path, ports: PortPicker) -> list[str]:
    """``ray start --address --num-cpus=0`` for the driver node, with a temp dir of its own: a driver picks its
    local node by temp dir when several share the host (``init_ray``, ``HEADBENCH_RAY_TEMP_DIR``)."""
    return [sys.executable, "-m", "infra.stack.ray_nodes", "start", f"--address={address}", f"--temp-dir={temp_dir}",
            *_node_flags(DRIVER_RESOURCE, 0, ports)]


def alive_node_resources(dashboard_url: str, timeout: float = 3.0, token: str | None = None) -> dict[str, str]:
    """{marker resource: node id} of the ALIVE nodes carrying a ``headbench_*`` resource, read from the
    dashboard's state API ({} while it does not answer). ``token``: the cluster's (RAY_AUTH_TOKEN)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=1",  # noqa: S310 - ours
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            rows = json.loads(resp.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: row["node_id"] for row in rows if row.get("state") == "ALIVE"
            for name in row.get("resources_total", {}) if name.startswith("headbench_")}


def alive_nodes(dashboard_url: str, timeout: float = 3.0, token: str | None = None) -> dict[int, str]:
    """{node index: node id} of the ALIVE nodes carrying a ``headbench_node_<i>`` resource."""
    prefix = NODE_RESOURCE.format("")
    return {int(name[len(prefix):]): node
            for name, node in alive_node_resources(dashboard_url, timeout, token).items()
            if name.startswith(prefix) and name[len(prefix):].isdigit()}


@dataclass(frozen=True)
class RayCluster:
    """A running cluster as clients see it: the GCS address (what RAY_ADDRESS holds), the dashboard URL (Ray's
    state API) and the pids of its node launchers, head first (each leads its node's process group)."""

    address: str
    dashboard_url: str
    launcher_pids: tuple[int, ...]
    token: str | None = None  # RAY_AUTH_TOKEN: the dashboard and every RPC refuse requests without it

    def node_ids(self) -> dict[int, str]:
        return alive_nodes(self.dashboard_url, token=self.token)

    def driver_node_id(self) -> str | None:
        return alive_node_resources(self.dashboard_url, token=self.token).get(DRIVER_RESOURCE)


if __name__ == "__main__":
    os.environ.update(LOOPBACK_ENV)  # before ray is imported: it reads the switch once
    from infra.training.ray_private import ray_start_on_loopback

    ray_start_on_loopback(sys.argv[1:])
