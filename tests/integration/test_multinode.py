"""A real two-node Ray cluster on one machine (the session's `ray_cluster`: a head with 2 CPUs and a worker
node with 1 CPU, each its own raylet, object store and node id): every socket on loopback, and the
placement strategy decides where the Ray Train workers run (SPREAD is the e2e test's run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from infra.ray_cluster import RayCluster
from tests.integration.conftest import Stack, train_worker_nodes

HEADBENCH = str(Path(sys.executable).parent / "headbench")


def _group_listeners(pgid: int) -> list[str]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                pids.add(pid)
        except ProcessLookupError:
            continue
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)]


def test_two_raylets_with_their_own_node_ids_all_on_loopback(ray_cluster: RayCluster) -> None:
    nodes = ray_cluster.node_ids()
    assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2
    for proc in ray_cluster.processes:  # each node launcher leads the process group of its node
        addresses = _group_listeners(proc.pid)
        assert addresses, proc.args
        assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in addresses), addresses


def test_pack_keeps_both_workers_on_the_node_that_holds_them(stack: Stack, ray_cluster: RayCluster) -> None:
    args = [HEADBENCH, "run", "--classes", "0-1", "--limit", "80", "--test-limit", "20", "--image-size", "32",
            "--epochs", "1", "--batch-size", "32", "--workers", "2", "--cpus-per-worker", "1",
            "--precise-bn-batches", "1", "--placement-strategy", "PACK", "--model-name", "multinode-pack"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False,
                          env=stack.cli_env(RAY_ADDRESS=ray_cluster.address))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"MLflow run : \S+/runs/(\w+)", done.stdout)
    assert run_id and stack.settings.mlflow_tracking_uri
    nodes = train_worker_nodes(ray_cluster, stack.settings.mlflow_tracking_uri, run_id.group(1))
    assert nodes == {ray_cluster.node_ids()[0]}  # only the 2-CPU head can hold both 1-CPU bundles
