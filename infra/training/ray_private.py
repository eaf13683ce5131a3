"""Every use of a Ray API that is not public, in one place: what each does, why no public API does it, and what
breaks on an upgrade. Each has a canary in ``tests/unit/test_ray_private.py`` that fails by name when Ray
moves or changes it; the prestart also has an end-to-end canary (``tests/integration/test_ray_local.py``:
Train's worker runs in the process that was prestarted), since a mismatch there only costs speed, silently.

1. ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` and ``ray.scripts.scripts.ray_constants``
   (``ray_start_on_loopback``): Ray's CLI refuses worker nodes while its loopback switch
   (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) is on, yet with the switch off it rewrites 127.0.0.1 to the
   machine's routable address and the node listens on every interface. The CLI runs unchanged with the switch
   on, except in its own guard, which sees a copy of the constants with multi-node allowed. Breaks: a Ray that
   renames the constant or the CLI's module attribute (worker nodes of ``up --ray-nodes`` refuse to start, in
   one line naming the node's log).
2. The raylet's ``PrestartWorkers`` gRPC call (``ray.core.generated.node_manager_pb2``,
   ``ray._private.grpc_utils.init_grpc_channel``) and the worker runtime env Train builds
   (``ray.train.v2._internal.constants``, ``WorkerGroup._get_worker_runtime_env``,
   ``ray._common.constants``) (``prestart_workers``, ``train_worker_runtime_env_json``): starts Train's worker
   processes while the run gets ready; the raylet hands one to an actor only if the runtime env matches byte
   for byte, so it is rebuilt with Train's own functions. No public API starts worker processes ahead of
   demand. Breaks: an ImportError/AttributeError/RpcError is logged and Ray starts workers on demand; a changed
   runtime env only leaves the prestarted processes unused (the end-to-end canary fails).
3. ``ray.train.v2._internal.callbacks.datasets.DatasetsCallback`` and ``TorchTrainer._create_default_callbacks``
   (``without_datasets_callback``): Train's datasets callback starts a DatasetManager actor and makes every
   worker import Ray Data even when no Ray Dataset is passed (the arrays go through the object store).
   Breaks: an ImportError at the first run, or the callback back in place (slower start, same results).
4. ``ray.train.v2._internal.execution.callback.WorkerGroupCallback`` (``WorkerGroupCallback``): the
   controller-side hook before the worker group starts, where the epoch logger imports MLflow while epoch 1
   trains. Public ``ray.train.UserCallback`` has no such hook. Breaks: an ImportError when the epoch logger is
   imported, or the hook never called (MLflow imported at the first report instead: slower, same records).
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

__all__ = ["prestart_workers", "ray_start_on_loopback", "train_worker_runtime_env_json",
           "without_datasets_callback"]


def ray_start_on_loopback(argv: list[str]) -> None:
    """``ray start ARGV`` for a worker node on this host, every socket on 127.0.0.1 (use 1)."""
    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    guard = types.SimpleNamespace(**{k: getattr(constants, k) for k in dir(constants) if not k.startswith("__")})
    guard.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = guard  # type: ignore[attr-defined]
    sys.argv = ["ray", *argv]
    scripts.main()


def train_worker_runtime_env_json(custom: dict[str, Any]) -> str:
    """The runtime environment of Train's worker actors as the raylet sees it (use 2): an actor inherits the
    runtime environment of the process that creates it, here Train's controller, and Ray's core worker merges
    the two (the parent's fields, then the child's; ``env_vars`` key by key) and writes the result as compact
    JSON with sorted keys. The controller's environment is what Train gives it on the driver (the driver's
    ``RAY_TRAIN_*`` variables and a default for blocking-get warnings); the workers' is what the controller adds
    to ``custom`` (the same variables, which the controller inherited)."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as WARN_VAR
    from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as WARN_DEFAULT
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    controller_vars = get_env_vars_to_propagate()
    controller_vars.setdefault(WARN_VAR, WARN_DEFAULT)
    worker = dict(WorkerGroup._get_worker_runtime_env(custom))
    merged = worker | {"env_vars": controller_vars | worker.get("env_vars", {})}
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def prestart_workers(node: dict[str, Any], job_id: str, runtime_env_json: str, count: int,
                     keep_alive_s: int) -> None:
    """Ask ``node``'s raylet (a ``ray.nodes()`` row) to start ``count`` Python worker processes of job
    ``job_id`` (hex) in that runtime environment now, each kept idle up to ``keep_alive_s`` (use 2). Raises
    ImportError, AttributeError, ValueError or grpc.RpcError when Ray has moved or refuses it."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2

    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON, job_id=bytes.fromhex(job_id),
        runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=runtime_env_json),
        keep_alive_duration_secs=keep_alive_s, num_workers=count)
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=5)
    finally:
        channel.close()


def without_datasets_callback(base: type) -> type:
    """``base`` (TorchTrainer) without Train's datasets callback when the run passes no Ray Dataset (use 3)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class ArrayTrainer(base):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return ArrayTrainer


def __getattr__(name: str) -> Any:
    """``WorkerGroupCallback`` (use 4), imported when asked for: the node launcher imports this module for use 1
    and must not pay for ray.train."""
    if name == "WorkerGroupCallback":
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback

        return WorkerGroupCallback
    raise AttributeError(name)
