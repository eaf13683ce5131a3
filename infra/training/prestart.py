"""Ray Train's worker processes, started while the run is still getting ready, with their imports done.

Ray starts a new Python process for each Train worker actor once Train's controller asks for it: that
process then imports ray.train, torch, torchvision and ``models`` (and ``torch._dynamo``, which the first
optimizer brings in) before the first step: most of a warm run's start-up (docs/performance.md). A raylet
can start processes ahead of demand: its ``PrestartWorkers`` call starts N workers of a job in a given
runtime environment and keeps them idle for a while, and an actor whose job and runtime environment match
takes one of them instead of a new process. So the driver asks for the run's worker processes as soon as it
knows how many it needs, and gives Train's workers a runtime environment whose setup hook (Ray's
worker-process setup hook, run when a worker process starts, before it takes a task) imports what the worker
will import (``infra.training.worker.preload``). The imports then run beside the driver's remaining set-up and the
controller's own start, not after them. Each process is still this run's alone: it runs one actor and exits
with it, as a process Train started itself would.

It is an optimisation and nothing depends on it: where the prestarted processes do not match (a cluster that
adds its own variables to Train's runtime environment) Ray starts workers as it always does, with the same
hook, and the unused processes exit when the job ends or their keep-alive runs out. Only a cluster whose
CPUs are on one node gets them (this host's private Ray, a one-node cluster): on several nodes the driver
cannot know which node Ray's placement group will choose, and a process started on another node would only
take memory and CPU there.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

PRELOAD_HOOK = "infra.training.worker.preload"
# What ``ray.init(runtime_env={"worker_process_setup_hook": ...})`` becomes in every worker's environment; Ray
# reads no such field from an actor's own runtime environment, so Train's workers get the variable itself
SETUP_HOOK_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
KEEP_ALIVE_S = 300  # an unused prestarted process exits this long after it started (or with the job)


def worker_runtime_env() -> dict[str, Any]:
    """The runtime environment of Train's worker actors (``RunConfig.worker_runtime_env``): the preload hook."""
    return {"env_vars": {SETUP_HOOK_VAR: PRELOAD_HOOK}}


def prestart_train_workers(count: int, runtime_env: dict[str, Any]) -> int:
    """Ask the raylet of the cluster's one CPU node to start ``count`` worker processes for Train's worker
    actors now (this process must be connected to Ray). Returns how many were asked for: 0 on a cluster
    whose CPUs span several nodes, or when the raylet cannot be asked (logged; training is unaffected)."""
    import ray

    cpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if count < 1 or len(cpu_nodes) != 1:
        return 0
    import grpc

    from infra.training import ray_private

    try:  # Ray's private API: a Ray that moved it is an ImportError or AttributeError here, not a failed run
        ray_private.prestart_workers(cpu_nodes[0], ray.get_runtime_context().get_job_id(),
                                       ray_private.train_worker_runtime_env_json(runtime_env), count, KEEP_ALIVE_S)
    except (grpc.RpcError, ImportError, AttributeError, ValueError) as exc:  # Ray starts them on demand instead
        logger.warning("could not prestart Ray Train's worker processes (%s: %s); Ray starts them on demand",
                       exc.__class__.__name__, exc)
        return 0
    return count
