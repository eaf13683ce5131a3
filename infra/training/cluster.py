"""Joining Ray for a run: a cluster named by ``RAY_ADDRESS``, or a private Ray on 127.0.0.1 started by this
process (``init_ray``), both with token auth; the environment Ray's processes read; and the placement
arithmetic that refuses a request the cluster can never hold (Ray itself would wait for it forever).

The nodes of the stack's own cluster (``headbench up --ray-nodes N``) are started by ``infra.stack.ray_nodes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infra.errors import HeadbenchError
from infra.processes.supervise import HOST, free_port
from models.options import option

if TYPE_CHECKING:
    from infra.settings import Settings

# Ray maps 127.0.0.1 to the machine's routable address unless told this is a single-host setup; this is
# Ray's own switch for that (named for desktop OSes), and keeps every Ray socket on the loopback interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Training, read by each raylet when it starts and by Train's controller (docs/performance.md has what each
# cost): Ray starts worker processes at nice 15 so they yield to its daemons, but a training worker is what
# the machine is for; at nice 15 every service on a small box preempted it. The controller polls its
# workers every 2 s by default, so a run waited up to that long to see its workers start and end.
TRAINING_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}
# Only where the cluster is this machine: Train's preemption watcher (an actor that polls Ray's node drain
# state every 5 s, for spot instances) has no preemption to watch for, and its process boots beside the
# training worker.
LOCAL_TRAINING_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Every node this host starts: Ray's log monitor (one process per node) re-globs the node's log folder on
# each 0.1 s pass while it tracks fewer than 1000 files, and every Train run adds a few worker logs, so its
# CPU grows with each run (measured in docs/performance.md). Once a second finds a new worker's log soon
# enough for `--verbose`.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "1", "LOG_NAME_UPDATE_INTERVAL_S": "1.0"}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


@dataclass(frozen=True)
class Resources:
    """What one training run asks of the Ray cluster (user options, ``models.options``)."""

    workers: int = option(2, "Ray Train data-parallel workers of a run (compare: of each child; children train "
                          "side by side)", ge=1, le=512)
    cpus_per_worker: int | None = option(None, "CPUs per worker; empty = run: the largest even share of the "
                                         "cluster's CPUs that fits every worker on one node; compare: 1",
                                         ge=1, le=512)
    use_gpu: bool = option(False, "one GPU per worker (bf16 autocast, channels_last)")
    placement_strategy: str = option("PACK", "where Ray puts the workers: PACK onto as few nodes as fit, SPREAD "
                                     "over as many nodes as possible, STRICT_PACK all on one node, STRICT_SPREAD "
                                     "each on a different node", choices=PLACEMENT_STRATEGIES)


class PlacementError(HeadbenchError):
    """A resource request the Ray cluster can never hold (Ray itself would wait for it forever)."""


def init_ray(settings: Settings) -> str | None:
    """Connect to ``RAY_ADDRESS`` when set, else start a private local instance bound to 127.0.0.1
    (never attach to a cluster by accident, never listen on other interfaces), both with token auth
    (``auth_env``). Returns the dashboard's URL (None when this process was connected already). Call it before
    anything imports ray: Ray reads its auth mode and token from the environment once, when it starts up."""
    local = not settings.ray_address or settings.ray_address.split(":")[0] in ("127.0.0.1", "localhost")
    # read by ray at import time, by a private Ray's raylet and by Train's controller: set before all three
    for key, value in (LOOPBACK_ENV | LOCAL_TRAINING_ENV | LOG_MONITOR_ENV | TRAINING_ENV if local
                       else TRAINING_ENV).items():
        os.environ.setdefault(key, value)
    os.environ.update(auth_env(settings))
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    settings.export_env()  # a private Ray's workers inherit this environment: their S3 credentials included
    if settings.ray_address:
        # several nodes on this host (the stack's cluster): attach to the one whose temp dir is named, the
        # driver node; otherwise Ray picks the head
        context = ray.init(address=settings.ray_address, log_to_driver=settings.ray_logs, logging_level="WARNING",
                           _temp_dir=str(settings.ray_temp_dir) if settings.ray_temp_dir else None)
    else:
        # The dashboard process serves Ray's state API, which Train V2's placement-group cleaner (and the
        # fault-injection tests) query; it binds 127.0.0.1 only. The processes ray.init starts inherit this
        # environment, and each asks the state API of the cluster its RAY_ADDRESS names (own_address_env).
        with own_address_env(f"{HOST}:{free_port()}"):
            context = ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=True,
                               dashboard_host=HOST, _node_ip_address=HOST, log_to_driver=settings.ray_logs,
                               logging_level="WARNING")
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


def auth_env(settings: Settings) -> dict[str, str]:
    """Ray's token auth for this process and what it starts: the settings' token (the stack's, RAY_AUTH_TOKEN);
    for a private Ray without one, a fresh token that only this process and its Ray know. A cluster named by
    RAY_ADDRESS without a token in the settings is joined as the environment says."""
    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    if token is None and not settings.ray_address:
        import secrets

        token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {}


@contextmanager
def own_address_env(gcs_address: str) -> Iterator[None]:
    """While a private Ray starts: its GCS on ``gcs_address`` and RAY_ADDRESS naming it, in the environment
    its raylet and so every worker process inherit, then this process's own variables back.

    Ray code inside a cluster that calls the state API without an address (Train's PlacementGroupCleaner asks
    it once a second whether the run's controller is alive) falls back to RAY_ADDRESS, then to the host's
    ``/tmp/ray/ray_current_cluster``, which names the last cluster ``ray start`` began here. A private Ray
    started with neither set asked that other cluster: a dead one held every run's end for the cleaner's
    12 s stop timeout; a live one, which has no such actor, made the cleaner take the controller for dead
    (and remove the run's placement group, were it registered by then). The driver keeps its own
    RAY_ADDRESS, so the settings it loads later still say "no cluster"."""
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=gcs_address, RAY_GCS_SERVER_PORT=gcs_address.rsplit(":", 1)[1])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cluster_node_cpus(settings: Settings) -> list[int]:
    """CPUs of each alive node of the Ray cluster this process trains on (starting or joining it first)."""
    init_ray(settings)  # first: it sets the variables ray reads when it is imported
    return node_cpus()


def node_cpus() -> list[int]:
    """CPUs of each alive node of the cluster this process is connected to that has any (a 0-CPU driver
    node never holds a training worker)."""
    import ray

    return [cpus for n in ray.nodes() if n.get("Alive") and (cpus := int(n["Resources"].get("CPU", 0)))]


def node_gpus() -> list[int]:
    """GPUs of each alive node of the cluster this process is connected to."""
    import ray

    return [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


def check_gpus(workers: int, gpus: list[int]) -> None:
    """``--gpu`` asks one GPU per worker: fail at once where Ray would wait forever for GPUs that do not exist."""
    if workers > (total := sum(gpus)):
        have = f"{total} GPU(s) on {len(gpus)} node(s)" if total else f"no GPU on its {len(gpus)} node(s)"
        allowed = f"at most {total} workers with --gpu, or --cpu" if total else "--cpu"
        raise PlacementError(f"--gpu: workers={workers} x 1 GPU need {workers} GPUs but the Ray cluster has "
                             f"{have}; allowed: {allowed}")


def workers_that_fit(cpus: int, nodes: list[int]) -> int:
    """How many workers of ``cpus`` CPUs the nodes hold at once: a worker's bundle never spans nodes."""
    return sum(n // cpus for n in nodes)


def even_share(workers: int, nodes: list[int]) -> int:
    """The most CPUs per worker such that ``workers`` such bundles fit on the nodes: the cluster's CPUs
    shared evenly, e.g. 1 worker on nodes [2, 1] gets 2, not 3."""
    fits = [c for c in range(1, max(nodes, default=1) + 1) if workers_that_fit(c, nodes) >= workers]
    return max(fits, default=1)


def check_placement(workers: int, cpus: int, strategy: str, nodes: list[int]) -> None:
    """Fail before Ray waits forever for a placement group the cluster can never hold."""
    total, biggest = sum(nodes), max(nodes, default=0)
    need = f"workers={workers} x {cpus} CPU"
    if workers * cpus > total:
        raise PlacementError(f"{need} need {workers * cpus} CPUs but the Ray cluster has {total}; allowed: "
                             f"workers * cpus_per_worker <= {total}")
    if cpus > biggest:
        raise PlacementError(f"{need}: a worker runs on one node, and the largest node has {biggest} CPUs; "
                             f"allowed: cpus_per_worker <= {biggest}")
    if (held := workers_that_fit(cpus, nodes)) < workers:
        raise PlacementError(f"{need}: the nodes ({', '.join(map(str, nodes))} CPUs) hold only {held} such "
                             "workers; use fewer workers or CPUs per worker")
    if strategy == "STRICT_PACK" and workers * cpus > biggest:
        raise PlacementError(f"{need} with placement STRICT_PACK need one node with {workers * cpus} CPUs; the "
                             f"largest node has {biggest}; use PACK or fewer workers")
    fitting = sum(1 for n in nodes if n >= cpus)
    if strategy == "STRICT_SPREAD" and workers > fitting:
        raise PlacementError(f"{need} with placement STRICT_SPREAD need {workers} nodes of >= {cpus} CPUs; the "
                             f"cluster has {fitting}; use SPREAD or at most {fitting} workers")
