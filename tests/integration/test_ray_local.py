"""A run without RAY_ADDRESS starts a private Ray whose every listening socket is on 127.0.0.1, and whose
processes (like the stack's Ray nodes') know their own cluster's address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from infra.processes.supervise import LOOPBACK_IPS, free_port
from tests.conftest import env_without_stack, run_together
from tests.integration.conftest import Stack

PROBE = r'''
import json, os, urllib.error, urllib.request
from infra.processes.supervise import descendants, listening
from infra.training.cluster import init_ray, node_cpus
from infra.settings import Settings
dashboard = init_ray(Settings(RAY_ADDRESS=None))
cpus = sum(node_cpus())
mine = {os.getpid(), *(p.pid for p in descendants(os.getpid()))}

def status(path, token=None, body=None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(dashboard + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code

job = json.dumps({"entrypoint": "touch /tmp/headbench-job-ran"}).encode()
print(json.dumps({"cpus": cpus, "addresses": listening(mine), "mode": os.environ.get("RAY_AUTH_MODE"),
                  "jobs": status("/api/jobs/"), "submit": status("/api/jobs/", body=job),
                  "wrong": status("/api/jobs/", "0" * 64), "token": status("/api/jobs/", os.environ["RAY_AUTH_TOKEN"]),
                  "token_file": os.path.exists(os.path.expanduser("~/.ray/auth_token"))}))
'''


def test_private_ray_listens_on_loopback_only_and_refuses_requests_without_its_token(tmp_path: Path) -> None:
    # a home of its own: a token file that another Ray once left in the user's home is not this run's
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cpus"] >= 1
    assert report["addresses"], "expected Ray's own listening sockets"
    outside = [a for a in report["addresses"] if a[0] not in LOOPBACK_IPS]
    assert outside == []
    # a private Ray makes a token of its own, known to its processes only (no file in the home folder)
    assert report["mode"] == "token" and not report["token_file"]
    assert (report["jobs"], report["submit"], report["wrong"], report["token"]) == (401, 401, 403, 200), report


# An actor asks the state API about itself with no address, as Train's PlacementGroupCleaner asks about the
# run's controller once a second: it must reach the cluster it runs in.
OWN_CLUSTER = r'''
import json, os, time
from infra.training.cluster import init_ray
from infra.settings import load_settings
init_ray(load_settings())  # RAY_ADDRESS (the stack's cluster) or a private Ray; before `import ray` (its auth mode)
import ray

@ray.remote(num_cpus=0)
class Asker:
    def ask(self, actor_id):
        from ray.util.state import get_actor
        start = time.time()
        try:
            state = get_actor(actor_id, timeout=5).state
        except Exception as exc:  # what Ray's cleaner would have met
            state = type(exc).__name__
        return {"state": state, "seconds": time.time() - start}

asker = Asker.remote()
print(json.dumps(ray.get(asker.ask.remote(asker._actor_id.hex()), timeout=60)))
'''


def _ask_own_state(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", OWN_CLUSTER], capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stale_ray_tmpdir() -> Path:
    """A RAY_TMPDIR whose ``ray/ray_current_cluster`` names a cluster that is gone, as a host's last
    ``ray start`` leaves it (short: Ray's unix sockets live under it)."""
    root = Path(tempfile.mkdtemp(prefix="hbt", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    return root


def test_a_private_rays_actors_ask_their_own_cluster_not_the_hosts_last_ray_start(tmp_path: Path) -> None:
    root = _stale_ray_tmpdir()
    try:
        env = {k: v for k, v in env_without_stack().items() if not k.startswith("RAY_")}
        report = _ask_own_state(env | {"RAY_TMPDIR": str(root), "HEADBENCH_HOME": str(tmp_path)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert report["state"] == "ALIVE", report  # the stale GCS's answer would be RpcError, after a 10 s wait


@pytest.mark.usefixtures("ray_cluster")
def test_the_stacks_ray_actors_ask_their_own_cluster(stack: Stack) -> None:
    # the nodes' environment is what their workers inherit: without RAY_ADDRESS there, an actor found the
    # host's last `ray start` of the default temp dir, or no cluster at all
    report = _ask_own_state(stack.cli_env())
    assert report["state"] == "ALIVE", report


# One Train worker on a private Ray, its process asked for first (as `run_training` does): Train's controller
# must hand the worker actor that prestarted process, its imports already done, not start a new one.
PRESTART = r'''
import json, sys, tempfile, time
from pathlib import Path
from infra.training.cluster import init_ray
from infra.settings import Settings
init_ray(Settings(RAY_ADDRESS=None))  # before `import ray`: Ray reads its auth mode when it starts up
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from infra.training.prestart import prestart_train_workers, worker_runtime_env

def fn(config):
    entered = time.time()
    import infra.training.worker as worker
    from infra.processes.supervise import process_started_at
    Path(config["out"]).write_text(json.dumps({"started": process_started_at(), "preloaded": worker._preloaded_at,
                                               "entered": entered}))

asked = prestart_train_workers(int(sys.argv[1]), worker_runtime_env())
time.sleep(2)  # the raylet starts the process within this (Train's controller alone takes longer to start)
out = tempfile.mktemp()
fit_called = time.time()
TorchTrainer(fn, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(storage_path=tempfile.mkdtemp(), worker_runtime_env=worker_runtime_env())).fit()
print(json.dumps(json.loads(Path(out).read_text()) | {"asked": asked, "fit_called": fit_called}))
'''


@pytest.fixture(scope="module")
def prestart_reports() -> dict[int, tuple[int, str, str]]:
    """The script with and without the prestart, side by side, each with a private Ray of its own:
    {prestart: (status, stdout, stderr)}."""
    env = {k: v for k, v in env_without_stack().items() if not k.startswith("RAY_")}
    return run_together({n: [sys.executable, "-c", PRESTART, str(n)] for n in (1, 0)}, env, timeout=300)


@pytest.mark.training
@pytest.mark.parametrize("prestart", [1, 0])
def test_train_takes_the_prestarted_worker_process_with_its_imports_done(
        prestart_reports: dict[int, tuple[int, str, str]], prestart: int) -> None:
    status, out, err = prestart_reports[prestart]
    assert status == 0, out[-3000:] + err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["asked"] == prestart
    # the hook ran in the worker's process either way, before the training function
    assert report["preloaded"] is not None and report["preloaded"] <= report["entered"]
    if prestart:  # the process Train's controller used existed before Train was even called
        assert report["started"] < report["fit_called"], report
    else:  # without it, Ray starts the worker's process once the controller asks for it
        assert report["started"] > report["fit_called"], report
