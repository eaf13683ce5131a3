"""A real two-node Ray cluster on one machine (the session's `ray_cluster`: a head with 2 CPUs and a worker
node with 1 CPU, each its own raylet, object store and node id): every socket on loopback, and the
placement strategy decides where the Ray Train workers run (SPREAD is the e2e test's run)."""

from __future__ import annotations

from infra.processes.supervise import LOOPBACK_IPS, group_members, listening
from infra.stack.ray_nodes import RayCluster
from tests.integration.conftest import Stack, train_actor_nodes


def test_two_raylets_with_their_own_node_ids_all_on_loopback(ray_cluster: RayCluster) -> None:
    nodes = ray_cluster.node_ids()
    assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2
    assert len(ray_cluster.launcher_pids) == 3  # head, worker node, driver node
    for pid in ray_cluster.launcher_pids:  # each node launcher leads the process group of its node
        addresses = listening(group_members(pid))
        assert addresses, pid
        assert all(ip in LOOPBACK_IPS for ip, _ in addresses), addresses


def test_pack_keeps_both_workers_on_the_node_that_holds_them(stack: Stack, ray_cluster: RayCluster,
                                                            imagefolder_run: tuple[list[str], dict[str, str]]) -> None:
    """The ImageFolder run: 2 workers x 1 CPU, PACK."""
    args, run = imagefolder_run
    assert args[args.index("--placement-strategy") + 1] == "PACK" and args[args.index("--workers") + 1] == "2"
    assert stack.settings.mlflow_tracking_uri
    nodes = train_actor_nodes(ray_cluster, stack.settings.mlflow_tracking_uri, run["run_id"])
    assert nodes["RayTrainWorker"] == {ray_cluster.node_ids()[0]}  # only the 2-CPU head holds both 1-CPU bundles
    # the CLI's driver attached to the 0-CPU driver node, so Train's controller ran there and no worker did
    assert nodes["TrainController"] == {ray_cluster.driver_node_id()}
