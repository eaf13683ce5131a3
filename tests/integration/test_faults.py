"""Faults injected for real: a Ray Train worker SIGKILLed mid-epoch, Ctrl-C on a run and its run resumed (once),
SeaweedFS stopped during publish, servers down at start, concurrent promotions."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from infra.processes.supervise import free_port, stop_group
from infra.publishing.store import ModelStore
from infra.stack.prefect_api import prefect_http
from infra.stack.ray_nodes import RayCluster
from infra.storage.s3 import s3_client
from tests.integration.conftest import Stack

HEADBENCH = str(Path(sys.executable).parent / "headbench")
# ~800 training images at 32 px on 2 workers: epochs of several seconds, long enough to strike inside one.
RUN = ["--classes", "0-2", "--limit", "900", "--test-limit", "60", "--image-size", "32", "--epochs", "3",
       "--batch-size", "32", "--strategy", "replace-fc", "--precise-bn-batches", "2", "--seed", "5"]


def _mlflow(stack: Stack) -> MlflowClient:
    return MlflowClient(stack.settings.mlflow_tracking_uri)


def _wait_for_run(stack: Stack, model_name: str, timeout: float = 300) -> str:
    client = _mlflow(stack)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(stack.settings.experiment)
        if exp:
            runs = client.search_runs([exp.experiment_id], f"tags.model_name = '{model_name}'")
            if runs:
                return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no MLflow run for {model_name} after {timeout} s")


def _wait_for_epoch(stack: Stack, run_id: str, epoch: int, timeout: float = 300) -> None:
    """Epoch ``epoch`` is logged only after its checkpoint is persisted: then the next epoch is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.step == epoch for m in _mlflow(stack).get_metric_history(run_id, "train_loss")):
            return
        time.sleep(0.3)
    raise AssertionError(f"epoch {epoch} of run {run_id} not logged after {timeout} s")


def _wait_for_snapshot(stack: Stack, run_id: str, epochs: int, timeout: float = 120) -> None:
    """Ray Train's controller registers a reported checkpoint shortly after the worker's report returns and
    then writes its snapshot, which is what a new driver restores from; wait until it lists ``epochs``."""
    client = s3_client(stack.settings)
    key = f"ray/{run_id}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = client.get_object(Bucket=stack.settings.checkpoint_bucket, Key=key)["Body"].read()
            if body.count(b"checkpoint_") >= epochs:
                return
        except client.exceptions.NoSuchKey:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint snapshot with {epochs} checkpoint(s) at s3://checkpoints/{key}")


def _steps(stack: Stack, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in _mlflow(stack).get_metric_history(run_id, key))


def _epoch_lines(output: str) -> list[str]:
    """Epochs the console printed ('1/3', ...), in order."""
    return [line.split("epoch ", 1)[1].split(" ", 1)[0] for line in output.splitlines()
            if "epoch " in line and " [finetune] " in line]


def _checkpoint_in_flight(stack: Stack, run_id: str, folder: str) -> bool:
    """Some of ``folder``'s objects are in S3 but Ray Train has not registered it (its snapshot lacks it): the
    worker's asynchronous upload of that checkpoint is under way."""
    client = s3_client(stack.settings)
    bucket, prefix = stack.settings.checkpoint_bucket, f"ray/{run_id}/"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{folder}/").get("KeyCount", 0)
    if not listed:
        return False
    try:
        snapshot = client.get_object(Bucket=bucket, Key=f"{prefix}checkpoint_manager_snapshot.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return True
    return folder.encode() not in snapshot


@pytest.mark.training
def test_worker_sigkilled_during_a_checkpoint_upload_resumes_from_the_last_checkpoint_taken(
        stack: Stack, ray_cluster: RayCluster) -> None:
    """Checkpoints every 2 epochs of 3, uploaded asynchronously: a worker SIGKILLed while the last epoch's
    checkpoint uploads restarts from epoch 2's (not from scratch, not from an unstored one), epoch 3 is trained
    again, and MLflow and the console have every epoch once."""
    import torch
    from ray.util.state import list_actors

    from infra.training.worker import TRAIN_STATE

    name = "fault-worker"
    proc = subprocess.Popen([HEADBENCH, "run", *RUN, "--workers", "2", "--model-name", name, "--checkpoint-every",
                             "2", "--checkpoint-upload", "async"],
                            env=stack.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_id = _wait_for_run(stack, name)
        _wait_for_snapshot(stack, run_id, 1)  # epoch 2's checkpoint is stored: a restart resumes from it
        deadline = time.monotonic() + 300
        while not _checkpoint_in_flight(stack, run_id, "checkpoint_epoch0003"):
            assert time.monotonic() < deadline and proc.poll() is None, "epoch 3's upload was never seen under way"
            time.sleep(0.05)
        workers = list_actors(address=ray_cluster.dashboard_url, limit=100, raise_on_missing_output=False,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"),
                                       ("job_id", "=", _driver_job(ray_cluster, proc.pid))])
        assert len(workers) == 2, workers  # this run's two workers, whatever else the cluster holds
        killed_at = time.time()
        os.kill(min(w.pid for w in workers), signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert _steps(stack, run_id) == [1, 2, 3]  # every epoch exactly once in MLflow
    assert _steps(stack, run_id, "val_accuracy") == [1, 2, 3]
    assert _epoch_lines(output) == ["1/3", "2/3", "3/3"], output[-4000:]
    assert _mlflow(stack).get_run(run_id).data.params["checkpoint_every"] == "2"
    # the published run's last checkpoint: epochs 1-2 trained before the kill (restored), epoch 3 after it
    body = s3_client(stack.settings).get_object(Bucket=stack.settings.checkpoint_bucket,
                                                Key=f"ray/{run_id}/checkpoint_epoch0003/{TRAIN_STATE}")["Body"]
    history = torch.load(io.BytesIO(body.read()), weights_only=True)["history"]
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    marks = [(r["first_step_at"], r["last_step_at"]) for r in history]
    assert history[1]["last_step_at"] < killed_at < history[2]["first_step_at"], (killed_at, marks, output[-6000:])
    assert _mlflow(stack).get_run(run_id).info.status == "FINISHED"


def _driver_job(cluster: RayCluster, pid: int) -> str:
    """The Ray job id of the driver process ``pid`` (a `headbench run` runs its flow, and so its Ray driver,
    in its own process)."""
    from ray.util.state import list_jobs

    jobs = [j for j in list_jobs(address=cluster.dashboard_url, limit=1000, raise_on_missing_output=False)
            if j.driver_info is not None and int(j.driver_info.pid) == pid]
    assert len(jobs) == 1, jobs
    return str(jobs[0].job_id)


def _alive_train_workers(cluster: RayCluster) -> list[Any]:
    from ray.util.state import list_actors

    return list_actors(address=cluster.dashboard_url, limit=100, raise_on_missing_output=False,
                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def _flow_run_state(stack: Stack, flow_run_id: str) -> str:
    from infra.stack.prefect_api import prefect_http

    with prefect_http(stack.settings) as client:
        return str(client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()["state"]["type"])


def _lease_holder(stack: Stack, run_id: str) -> str | None:
    import json

    client = s3_client(stack.settings)
    try:
        body = client.get_object(Bucket=stack.settings.checkpoint_bucket, Key=f".run-leases/{run_id}.lease")["Body"]
    except client.exceptions.NoSuchKey:
        return None
    return str(json.loads(body.read())["owner"])


@pytest.mark.training
def test_ctrl_c_aborts_cleanly_and_the_run_resumes_once_from_its_s3_checkpoint(stack: Stack,
                                                                               ray_cluster: RayCluster) -> None:
    """Ctrl-C in epoch 2 (SIGINT to the command's process group, as a terminal sends it) ends the command
    within 10 s in one line: the Ray job aborted (no train worker left), the MLflow run KILLED, the Prefect
    flow run CANCELLED, nothing published. `--resume-run-id` then continues the same MLflow run and Ray
    run name from the last S3 checkpoint; of two resumes started together, the one that does not hold the
    run's lease is refused at once."""
    name = "fault-resume"
    env = stack.cli_env()
    args = [HEADBENCH, "run", *RUN, "--workers", "2", "--model-name", name]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        run_id = _wait_for_run(stack, name)
        _wait_for_epoch(stack, run_id, 1)
        _wait_for_snapshot(stack, run_id, 1)
        assert len(_alive_train_workers(ray_cluster)) == 2
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - pressed
    finally:
        stop_group(proc.pid, timeout=5)
    assert took < 30, f"Ctrl-C took {took:.1f} s"  # generous (about 5 s here): the promise is 10 s, unloaded
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted: the Ray job was aborted"), err[-3000:]
    assert "Traceback" not in err
    run = _mlflow(stack).get_run(run_id)
    assert run.info.status == "KILLED"
    assert _flow_run_state(stack, run.data.tags["prefect.flow_run_id"]) == "CANCELLED"
    assert _state(stack, name)["keys"] == [] and _state(stack, name)["versions"] == []  # nothing published
    deadline = time.monotonic() + 10
    while _alive_train_workers(ray_cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive_train_workers(ray_cluster) == []  # the job's actors went with it
    assert _lease_holder(stack, run_id) is None  # released on the way out
    logged_before = _steps(stack, run_id)
    assert logged_before and logged_before[0] == 1

    mismatch = subprocess.run([*args, "--epochs", "4", "--resume-run-id", run_id], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
    assert mismatch.returncode == 2
    assert "was run with epochs='3'" in mismatch.stderr.strip().splitlines()[-1]

    # two resumes of the run at once: whichever takes the run's lease first trains, the other is refused
    # while it does (both start together, so a loaded machine slows both alike)
    resumes = [subprocess.Popen([*args, "--resume-run-id", run_id], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    try:
        ended = []
        for p in resumes:
            out, err = p.communicate(timeout=600)
            ended.append((p.returncode, out, err))
    finally:
        for p in resumes:
            stop_group(p.pid, timeout=5)
    assert sorted(code for code, _, _ in ended) == [0, 2], [e[2][-2000:] for e in ended]
    (_, out, err), = [e for e in ended if e[0] == 0]
    (_, _, refused), = [e for e in ended if e[0] == 2]
    assert f"MLflow run {run_id} is already being trained by flow run" in refused.splitlines()[-1], refused[-2000:]
    assert _steps(stack, run_id) == [1, 2, 3]
    assert "1/3" not in _epoch_lines(out), out[-3000:]  # epoch 1 was not trained again
    run = _mlflow(stack).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.tags["model_s3_uri"].endswith(f"/{name}/{run_id}/")
    assert len(_state(stack, name)["versions"]) == 1  # the refused resume wrote nothing


def _state(stack: Stack, name: str) -> dict[str, Any]:
    client = s3_client(stack.settings)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=stack.settings.model_bucket,
                                                            Prefix=f"{name}/").get("Contents", []))
    store = ModelStore(client, stack.settings.model_bucket, stack.settings.s3_endpoint_url)
    mlflow = _mlflow(stack)
    versions = sorted(v.version for v in mlflow.search_model_versions(f"name = '{name}'"))
    try:
        alias = mlflow.get_model_version_by_alias(name, "champion").version
    except Exception:  # noqa: BLE001 - no model or no alias yet
        alias = None
    return {"keys": keys, "versions": versions, "alias": alias, "pointer": store.read_champion(name)}


SMALL = ["--classes", "0-2", "--limit", "120", "--test-limit", "60", "--image-size", "32", "--epochs", "1",
         "--batch-size", "32", "--workers", "1", "--precise-bn-batches", "1"]


# The CLI, with a listener on the flow's stage hook that stops SeaweedFS the moment publishing starts.
STOP_S3_AT_PUBLISH = """
import sys
from infra.settings import load_settings
load_settings().export_env()  # as the CLI does, before prefect is imported
from flows.cli import app
from flows.stages import listening
from infra.processes.supervise import stop_group

with listening(lambda stage: stage == "publish" and stop_group({pid}, 20)):
    app(sys.argv[1:])
"""


@pytest.mark.training
def test_s3_down_during_publish_fails_in_one_line_changes_nothing_and_resumes_once(
        stack: Stack, ray_cluster: RayCluster) -> None:
    name = "fault-s3"
    env = stack.cli_env()
    first = subprocess.run([HEADBENCH, "run", *SMALL, "--model-name", name], env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _state(stack, name)
    assert before["alias"] == "1" and before["pointer"]["version"] == "1"

    s3_pid = int((stack.home / "pids" / "s3.pid").read_text())
    args = ["run", *SMALL, "--model-name", name, "--promote", "always"]
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", STOP_S3_AT_PUBLISH.format(pid=s3_pid), *args], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        elapsed = time.monotonic() - started
    finally:
        stack.stack.up(timeout=120)  # S3 back, same data directory, for the checks and later tests
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and stack.settings.s3_endpoint_url in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and elapsed < 300  # bounded retries, then one line
    assert _state(stack, name) == before  # no manifest, no version; alias and champion.json untouched
    run_id = _wait_for_run_count(stack, name, 2)
    failed = _mlflow(stack).get_run(run_id)
    assert failed.info.status == "FAILED"
    model_id = failed.data.tags["mlflow_model_id"]  # created before the upload, so the manifest can name it
    assert _mlflow(stack).get_logged_model(model_id).status == LoggedModelStatus.FAILED

    # S3 is back: rerun the same run; training is restored from its last checkpoint, publish happens once
    again = subprocess.run([HEADBENCH, *args, "--resume-run-id", run_id], env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = _state(stack, name)
    new_keys = sorted(set(after["keys"]) - set(before["keys"]))
    assert new_keys == [f"{name}/{run_id}/manifest.json", f"{name}/{run_id}/model.safetensors"], new_keys
    assert after["versions"] == ["1", "2"] and after["alias"] == "2" and after["pointer"]["version"] == "2"
    assert _steps(stack, run_id) == [1]  # the epoch was logged once, not again by the resumed run
    assert _mlflow(stack).get_logged_model(model_id).status == LoggedModelStatus.READY  # the same logged model


def _wait_for_run_count(stack: Stack, model_name: str, count: int, timeout: float = 300) -> str:
    client = _mlflow(stack)
    exp = client.get_experiment_by_name(stack.settings.experiment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.search_runs([exp.experiment_id], f"tags.model_name = '{model_name}'",
                                  order_by=["attributes.start_time DESC"])
        if len(runs) >= count:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} MLflow runs for {model_name} after {timeout} s")


def test_a_server_down_at_start_fails_fast_before_any_work(stack: Stack, tmp_path: Path) -> None:
    """MLflow, Prefect or S3 unreachable: `headbench run` ends in one line naming the dead URL and `headbench
    up`, before any work (nothing downloaded, no MLflow run, no flow run recorded). The three commands run
    side by side."""
    variables = {"mlflow": "MLFLOW_TRACKING_URI", "prefect": "PREFECT_API_URL", "s3": "AWS_ENDPOINT_URL_S3"}
    dead = {server: f"http://127.0.0.1:{free_port()}" for server in variables}
    mlflow = _mlflow(stack)
    runs_before = _flow_run_count(stack)
    procs = {}
    for server, variable in variables.items():
        env = stack.cli_env(**{variable: dead[server] + ("/api" if server == "prefect" else "")},
                            HEADBENCH_DATA_CACHE=str(tmp_path / server))
        procs[server] = subprocess.Popen([HEADBENCH, "run", *SMALL, "--model-name", f"fault-down-{server}"], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    for server, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - started  # an upper bound of this command's own time
        assert proc.returncode == 2, out[-2000:] + err[-2000:]
        last = err.strip().splitlines()[-1]
        assert dead[server] in last and "headbench up" in last, last
        assert elapsed < 60, elapsed  # generous: three CLIs start at once; the probes themselves take seconds
        assert not (tmp_path / server).exists()  # nothing was downloaded
    exp = mlflow.get_experiment_by_name(stack.settings.experiment)
    assert exp is None or not mlflow.search_runs([exp.experiment_id], "params.model_name LIKE 'fault-down-%'")
    assert _flow_run_count(stack) == runs_before  # no flow run was even created


def _flow_run_count(stack: Stack) -> int:
    """Flow runs started outside any deployment, as `headbench run` starts them (the scheduler of a deployed
    cron schedule adds runs of its own whenever its loop comes round)."""
    with prefect_http(stack.settings) as api:
        return int(api.post("/flow_runs/count", json={"flow_runs": {"deployment_id": {"is_null_": True}}})
                   .raise_for_status().json())


def test_concurrent_promotions_move_the_alias_once_per_compare_and_set(stack: Stack) -> None:
    """The S3 lease admits one holder at a time: 8 threads racing for it never overlap."""
    store = ModelStore(s3_client(stack.settings), stack.settings.model_bucket, stack.settings.s3_endpoint_url)
    inside, overlaps, order = [0], [0], []
    lock = threading.Lock()

    def contender(i: int) -> None:
        with store.lease("fault-lease", owner=f"t{i}", ttl_s=60, wait_s=60):
            with lock:
                inside[0] += 1
                overlaps[0] = max(overlaps[0], inside[0])
            time.sleep(0.2)
            order.append(i)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(order) == list(range(8)) and overlaps[0] == 1
    assert store.client.list_objects_v2(Bucket=store.bucket, Prefix="fault-lease/").get("KeyCount", 0) == 0


@pytest.mark.parametrize("case", ["wrong-secret", "missing-bucket", "wrong-mlflow-password"])
def test_wrong_credentials_or_missing_bucket_fail_before_any_work(stack: Stack, tmp_path: Path, case: str) -> None:
    wrong = "not-the-secret-" + "x" * 20
    extra = {"wrong-secret": {"AWS_SECRET_ACCESS_KEY": wrong, "AWS_ACCESS_KEY_ID": stack.stack.access_key or "",
                              "AWS_ENDPOINT_URL_S3": stack.stack.s3_url},
             "missing-bucket": {"HEADBENCH_MODEL_BUCKET": "no-such-bucket"},
             "wrong-mlflow-password": {"MLFLOW_TRACKING_PASSWORD": wrong}}[case]
    expected = {"wrong-secret": "rejected the credentials", "missing-bucket": "S3 bucket missing",
                "wrong-mlflow-password": "refused the login (HTTP 401)"}[case]
    where = stack.stack.mlflow_url if case == "wrong-mlflow-password" else stack.stack.s3_url
    cache = tmp_path / "cache"
    done = subprocess.run([HEADBENCH, "run", *SMALL, "--model-name", "fault-creds"], capture_output=True,
                          text=True, timeout=120, check=False,
                          env=stack.cli_env(**extra, HEADBENCH_DATA_CACHE=str(cache)))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert expected in last and where in last, last
    assert wrong not in done.stdout + done.stderr  # the bad secret is not echoed either
    assert not cache.exists()
