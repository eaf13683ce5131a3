"""A real two-node Ray cluster on one machine (the session's `ray_cluster`: a head with 2 CPUs and a worker
node with 1 CPU, each its own raylet, object store and node id): every socket on loopback, and the
placement strategy decides where the Ray Train workers run (SPREAD is the e2e test's run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.procs import LOOPBACK_IPS, group_members, listening
from infra.ray_cluster import RayCluster
from tests.integration.conftest import Stack, train_actor_nodes

HEADBENCH = str(Path(sys.executable).parent / "headbench")


def test_two_raylets_with_their_own_node_ids_all_on_loopback(ray_cluster: RayCluster) -> None:
    nodes = ray_cluster.node_ids()
    assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2
    assert len(ray_cluster.launcher_pids) == 3  # head, worker node, driver node
    for pid in ray_cluster.launcher_pids:  # each node launcher leads the process group of its node
        addresses = listening(group_members(pid))
        assert addresses, pid
        assert all(ip in LOOPBACK_IPS for ip, _ in addresses), addresses


@pytest.mark.training
def test_pack_keeps_both_workers_on_the_node_that_holds_them(stack: Stack, ray_cluster: RayCluster) -> None:
    args = [HEADBENCH, "run", "--classes", "0-1", "--limit", "80", "--test-limit", "20", "--image-size", "32",
            "--epochs", "1", "--batch-size", "32", "--workers", "2", "--cpus-per-worker", "1",
            "--precise-bn-batches", "1", "--placement-strategy", "PACK", "--model-name", "multinode-pack"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False,
                          env=stack.cli_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"MLflow run : \S+/runs/(\w+)", done.stdout)
    assert run_id and stack.settings.mlflow_tracking_uri
    nodes = train_actor_nodes(ray_cluster, stack.settings.mlflow_tracking_uri, run_id.group(1))
    assert nodes["RayTrainWorker"] == {ray_cluster.node_ids()[0]}  # only the 2-CPU head holds both 1-CPU bundles
    # the CLI's driver attached to the 0-CPU driver node, so Train's controller ran there and no worker did
    assert nodes["TrainController"] == {ray_cluster.driver_node_id()}
