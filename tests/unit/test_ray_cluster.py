"""Placement checks that run before Ray would wait forever for a placement group the cluster cannot hold,
and the pieces of the local multi-node cluster that need no Ray processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.stack.ray_nodes import DRIVER_RESOURCE, NODE_RESOURCE, PortPicker, driver_node_argv, head_argv, node_argv
from infra.training.cluster import PlacementError, check_placement, even_share


@pytest.mark.parametrize("workers, cpus, strategy, nodes", [
    (2, 1, "PACK", [2, 1]), (3, 1, "SPREAD", [2, 1]), (2, 1, "STRICT_PACK", [2, 1]),
    (2, 1, "STRICT_SPREAD", [2, 1]), (4, 2, "STRICT_SPREAD", [2, 2, 2, 2]), (1, 8, "PACK", [8]),
])
def test_placements_the_cluster_can_hold_pass(workers: int, cpus: int, strategy: str, nodes: list[int]) -> None:
    check_placement(workers, cpus, strategy, nodes)


@pytest.mark.parametrize("workers, cpus, strategy, nodes, message", [
    (4, 1, "PACK", [2, 1], "workers=4 x 1 CPU need 4 CPUs but the Ray cluster has 3"),
    (3, 1, "STRICT_PACK", [2, 1], "with placement STRICT_PACK need one node with 3 CPUs; the largest node has 2"),
    (3, 1, "STRICT_SPREAD", [2, 1], "with placement STRICT_SPREAD need 3 nodes of >= 1 CPUs; the cluster has 2"),
    (2, 2, "STRICT_SPREAD", [4, 1, 1], "need 2 nodes of >= 2 CPUs; the cluster has 1"),
])
def test_impossible_placements_fail_in_one_line(workers: int, cpus: int, strategy: str, nodes: list[int],
                                                message: str) -> None:
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_placement(workers, cpus, strategy, nodes)


def test_nodes_get_distinct_ports_marker_resources_and_loopback() -> None:
    picker = PortPicker()
    head = head_argv(41000, 41001, 2, Path("hbray"), picker)
    nodes = [node_argv("127.0.0.1:41000", i, 1, picker) for i in (1, 2)]
    driver = driver_node_argv("127.0.0.1:41000", Path("hbray-d"), picker)
    nodes.append(driver)
    ports: list[int] = []
    for argv in (head, *nodes):
        flags = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        assert flags["node-ip-address"] == "127.0.0.1"
        ports += [int(v) for k, v in flags.items() if k.endswith("-port") and k not in ("min-worker-port",
                                                                                        "max-worker-port")]
        ports += list(range(int(flags["min-worker-port"]), int(flags["max-worker-port"]) + 1))
    assert len(ports) == len(set(ports))  # no two nodes (or worker ranges) share a port
    assert NODE_RESOURCE.format(0) in " ".join(head) and NODE_RESOURCE.format(2) in " ".join(nodes[1])
    assert "--head" in head and all("--address=127.0.0.1:41000" in n for n in nodes)
    assert {"--num-cpus=0", "--temp-dir=hbray-d", f'--resources={{"{DRIVER_RESOURCE}": 1}}'} <= set(driver)


@pytest.mark.parametrize("workers, nodes, share", [
    (1, [2], 2), (2, [2], 1), (1, [2, 1], 2), (2, [2, 1], 1), (3, [2, 1], 1), (2, [4, 4], 4), (3, [4, 4], 2),
    (5, [2, 1], 1),  # more workers than CPUs: 1 each, and check_placement names the shortfall
])
def test_even_share_fits_whole_workers_on_nodes(workers: int, nodes: list[int], share: int) -> None:
    assert even_share(workers, nodes) == share


def test_a_worker_never_spans_nodes() -> None:
    with pytest.raises(PlacementError, match=r"workers=1 x 3 CPU: a worker runs on one node, and the largest node "
                                            r"has 2 CPUs; allowed: cpus_per_worker <= 2"):
        check_placement(1, 3, "PACK", [2, 1])
    with pytest.raises(PlacementError, match=r"workers=3 x 2 CPU: the nodes \(2, 2, 1, 1 CPUs\) hold only 2 such "
                                            r"workers"):
        check_placement(3, 2, "SPREAD", [2, 2, 1, 1])
