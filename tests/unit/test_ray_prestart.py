"""The prestarted Train worker processes (infra/training/prestart.py): what their hook imports, and the runtime
environment string the raylet matches them by. That Train really takes them is checked on a real private Ray
in tests/integration/test_ray_local.py."""

from __future__ import annotations

import json
import subprocess
import sys

from infra.training.prestart import PRELOAD_HOOK, SETUP_HOOK_VAR, worker_runtime_env
from infra.training.ray_private import train_worker_runtime_env_json

# the hook runs before the process has an actor, so before Ray sets CUDA_VISIBLE_DEVICES for a GPU worker: it
# must not let CUDA count devices (a CUDA runtime initialised then sees every GPU of the machine)
PRELOAD_PROBE = r'''
import sys, torch
calls = []
count = torch._C._cuda_getDeviceCount
torch._C._cuda_getDeviceCount = lambda *a: calls.append(1) or count(*a)
import infra.training.worker as worker
worker.preload()
print(worker._preloaded_at is not None, sorted(m for m in ("ray.train.torch", "torch._dynamo", "torchvision")
                                               if m in sys.modules), len(calls))
'''


def test_the_preload_hook_imports_what_a_worker_needs_and_leaves_cuda_alone() -> None:
    done = subprocess.run([sys.executable, "-c", PRELOAD_PROBE], capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True ['ray.train.torch', 'torch._dynamo', 'torchvision'] 0"


def test_the_worker_runtime_env_is_the_controllers_merged_with_the_workers_as_ray_writes_it(monkeypatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    monkeypatch.delenv("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", raising=False)
    text = train_worker_runtime_env_json(worker_runtime_env())
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))  # compact, keys sorted
    env_vars = json.loads(text)["env_vars"]
    assert env_vars[SETUP_HOOK_VAR] == PRELOAD_HOOK  # the workers' own
    assert env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.0"  # what Train propagates from the driver
    assert "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC" in env_vars  # what the controller's environment adds
