"""Canaries of infra/training/ray_private.py: each private Ray API it uses is where, and does what, the module
relies on. A Ray upgrade that moves or changes one fails here by name, before any run does. (The prestart's
end-to-end canary, that Train's worker runs in the prestarted process, is tests/integration/test_ray_local.py.)"""

from __future__ import annotations

import inspect
import json

import pytest

from infra.training import ray_private


def test_use_1_the_cli_reads_its_multi_node_guard_from_a_module_attribute_we_can_swap() -> None:
    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    assert hasattr(constants, "ENABLE_RAY_CLUSTER")  # the guard's switch
    assert scripts.ray_constants is constants  # the CLI looks it up through this attribute
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(scripts.start.callback)  # `ray start` reads it
    assert callable(scripts.main)


def test_use_2_the_raylet_still_takes_a_prestart_request_of_this_shape() -> None:
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2

    assert callable(init_grpc_channel)
    fields = set(node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name)
    assert {"language", "job_id", "runtime_env_info", "keep_alive_duration_secs", "num_workers"} <= fields
    assert "serialized_runtime_env" in runtime_environment_pb2.RuntimeEnvInfo.DESCRIPTOR.fields_by_name
    assert hasattr(node_manager_pb2_grpc.NodeManagerServiceStub, "__init__") and common_pb2.PYTHON is not None
    assert "PrestartWorkers" in node_manager_pb2_grpc.NodeManagerServiceServicer.__dict__


def test_use_2_trains_worker_runtime_env_is_rebuilt_with_its_own_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    assert callable(WorkerGroup._get_worker_runtime_env)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    text = ray_private.train_worker_runtime_env_json({"env_vars": {"A": "1"}})
    env_vars = json.loads(text)["env_vars"]
    assert env_vars["A"] == "1" and env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.0"


def test_use_3_train_still_adds_a_datasets_callback_we_can_leave_out() -> None:
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    assert "_create_default_callbacks" in {n for c in TorchTrainer.__mro__ for n in vars(c)}
    assert "DatasetsCallback" in inspect.getsource(TorchTrainer._create_default_callbacks)
    trainer = ray_private.without_datasets_callback(TorchTrainer)
    assert issubclass(trainer, TorchTrainer) and isinstance(DatasetsCallback, type)


def test_use_4_the_worker_group_callback_has_the_hook_the_epoch_logger_overrides() -> None:
    from infra.training.epoch_log import ImportMlflowDuringEpoch1

    base = ray_private.WorkerGroupCallback
    overridden = {name for name in vars(ImportMlflowDuringEpoch1) if not name.startswith("__")}
    assert overridden and overridden <= set(dir(base)), overridden - set(dir(base))
    assert issubclass(ImportMlflowDuringEpoch1, base)


def test_every_private_use_is_in_this_module_alone() -> None:
    """The rule the module exists for: no other source file reaches into Ray's private packages."""
    import pathlib
    import re

    root = pathlib.Path(ray_private.__file__).parents[2]
    private = re.compile(r"ray\._private|ray\._common|ray\.train\.v2\._internal|ray\.core\.generated|_raylet")
    offenders = [str(p.relative_to(root)) for folder in ("models", "infra", "tasks", "flows", "bench", "tools")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "ray_private.py" and private.search(p.read_text())]
    assert offenders == []
