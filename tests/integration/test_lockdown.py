"""Every local service of the stack refuses a caller without the stack's credentials, as a process of another
user on the machine would call it (no env file): MLflow (its basic-auth login), the Ray cluster's dashboard,
job API and GCS (its token), and SeaweedFS beyond its S3 gateway (no master or filer HTTP API, no admin UI,
JWT-signed volume access, mutual TLS on gRPC). With the credentials, the clients headbench starts work (the whole
suite's runs), and so does `mlflow models serve` on a registered model (test_mlflow_model.py)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import grpc
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from infra.stack.ray_nodes import RayCluster
from infra.training.cluster import LOOPBACK_ENV
from tests.conftest import env_without_stack
from tests.integration.conftest import Stack

BIN = Path(sys.executable).parent


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_mlflow_needs_the_stacks_login(stack: Stack, e2e_run: dict[str, str]) -> None:
    mlflow, password = stack.stack.mlflow_url, stack.stack.mlflow_password
    assert password and stack.settings.mlflow_tracking_password
    assert stack.settings.mlflow_tracking_password.get_secret_value() == password
    env_file = stack.stack.env_file.read_text()
    assert "MLFLOW_TRACKING_USERNAME=admin" in env_file and f"MLFLOW_TRACKING_PASSWORD={password}" in env_file
    search = f"{mlflow}/api/2.0/mlflow/runs/get"
    run = {"run_id": e2e_run["run_id"]}
    assert httpx.get(f"{mlflow}/health", timeout=10).status_code == 200  # the probe stays open
    assert httpx.get(search, params=run, timeout=10).status_code == 401
    assert httpx.get(mlflow, timeout=10).status_code == 401  # the UI asks for the login
    for wrong in (("admin", "password1234"), ("admin", password[:-1]), ("headbench", password)):  # the default too
        assert httpx.get(search, params=run, headers=_basic(*wrong), timeout=10).status_code == 401, wrong
    # moving the champion alias, which the next warm start loads, is refused without the login
    alias = {"name": "e2e-test", "alias": "champion", "version": "1"}
    assert httpx.post(f"{mlflow}/api/2.0/mlflow/registered-models/alias", json=alias,
                      timeout=10).status_code == 401
    ok = httpx.get(search, params=run, headers=_basic("admin", password), timeout=10)
    assert ok.status_code == 200 and ok.json()["run"]["info"]["run_id"] == e2e_run["run_id"]
    ui = httpx.get(mlflow, headers=_basic("admin", password), timeout=10)  # what the browser's sign-in sends
    assert ui.status_code == 200 and "<title>MLflow</title>" in ui.text


def test_the_ray_clusters_dashboard_jobs_and_gcs_need_the_token(stack: Stack, ray_cluster: RayCluster) -> None:
    token = stack.stack.ray_token
    assert token and ray_cluster.token == token and f"RAY_AUTH_TOKEN={token}" in stack.stack.env_file.read_text()
    jobs = f"{ray_cluster.dashboard_url}/api/jobs/"
    job = {"entrypoint": "touch /tmp/headbench-lockdown-job-ran"}
    assert httpx.get(jobs, timeout=10).status_code == 401
    assert httpx.post(jobs, json=job, timeout=10).status_code == 401
    assert httpx.get(f"{ray_cluster.dashboard_url}/api/v0/nodes", timeout=10).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10).status_code == 403
    listed = httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert listed.status_code == 200 and all(j.get("entrypoint") != job["entrypoint"] for j in listed.json())
    # the GCS itself: a driver with a wrong token is turned away by Ray's own client, which then keeps retrying:
    # read its log until the refusal shows, then stop it
    env = {k: v for k, v in env_without_stack().items() if not k.startswith("RAY_")}
    probe = "import ray; ray.init(address=__import__('sys').argv[1]); print('joined', flush=True)"
    driver = subprocess.Popen([sys.executable, "-c", probe, ray_cluster.address], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env=env | LOOPBACK_ENV | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    seen: list[str] = []
    watchdog = threading.Timer(120, os.killpg, (driver.pid, signal.SIGKILL))  # a driver that says nothing
    watchdog.start()
    try:
        assert driver.stdout is not None
        for line in driver.stdout:  # ends when the driver exits, or at the refusal
            seen.append(line)
            if "Authentication token is missing or incorrect" in line or line.startswith("joined"):
                break
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert "Authentication token is missing or incorrect" in seen[-1], "".join(seen)[-3000:]


def test_seaweedfs_is_reached_only_through_its_s3_gateway_with_the_keys(stack: Stack) -> None:
    p, host = stack.stack.ports, "http://127.0.0.1"
    refused = {
        "filer PUT": httpx.put(f"{host}:{p.weed_filer}/buckets/{stack.settings.model_bucket}/planted.txt",
                               content=b"x", timeout=10).status_code,
        "filer GET": httpx.get(f"{host}:{p.weed_filer}/buckets/{stack.settings.model_bucket}/", timeout=10
                               ).status_code,
        "filer DELETE": httpx.delete(f"{host}:{p.weed_filer}/buckets/{stack.settings.model_bucket}",
                                     params={"recursive": "true"}, timeout=10).status_code,
        "master delete collection": httpx.get(f"{host}:{p.weed_master}/col/delete",
                                              params={"collection": stack.settings.model_bucket},
                                              timeout=10).status_code,
        "master assign": httpx.get(f"{host}:{p.weed_master}/dir/assign", timeout=10).status_code,
        "volume GET": httpx.get(f"{host}:{p.weed_volume}/1,0123456789", timeout=10).status_code,
        "volume PUT": httpx.post(f"{host}:{p.weed_volume}/1,0123456789", files={"file": b"x"},
                                 timeout=10).status_code,
        "admin UI": httpx.get(f"{host}:{p.weed_admin}/files", timeout=10).status_code,
    }
    assert all(code in (401, 404) for code in refused.values()), refused
    assert refused["volume GET"] == refused["volume PUT"] == 401  # the JWT check, not a missing route

    def s3(key: str, secret: str):
        return boto3.client("s3", endpoint_url=stack.stack.s3_url, aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as err:
        s3(stack.stack.access_key or "", "not-the-secret").list_objects_v2(Bucket=stack.settings.model_bucket)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        s3("nobody", "nothing").put_object(Bucket=stack.settings.model_bucket, Key="planted.txt", Body=b"x")
    keyed = s3(stack.stack.access_key or "", stack.stack.secret_key or "")
    keyed.put_object(Bucket=stack.settings.data_bucket, Key="lockdown/probe.json", Body=json.dumps({"ok": 1}))
    body = keyed.get_object(Bucket=stack.settings.data_bucket, Key="lockdown/probe.json")["Body"].read()
    assert json.loads(body) == {"ok": 1}
    keyed.delete_object(Bucket=stack.settings.data_bucket, Key="lockdown/probe.json")
    planted = keyed.list_objects_v2(Bucket=stack.settings.model_bucket, Prefix="planted")
    assert planted.get("KeyCount", 0) == 0  # nothing got in by the side doors


@pytest.mark.parametrize("port", ["weed_master_grpc", "weed_volume_grpc", "weed_filer_grpc", "s3_grpc"])
def test_seaweedfs_grpc_ports_need_the_stacks_certificate(stack: Stack, port: str) -> None:
    """`weed shell` and every other gRPC client: plaintext, or TLS without a client certificate, never gets a
    channel; the stack's own certificate (what SeaweedFS's components present to each other) does."""
    tls = stack.home / "s3" / "tls"
    target = f"127.0.0.1:{getattr(stack.stack.ports, port)}"
    ca, cert, key = ((tls / name).read_bytes() for name in ("ca.crt", "tls.crt", "tls.key"))

    def ready(channel: grpc.Channel, wait: float = 2.0) -> bool:
        try:
            grpc.channel_ready_future(channel).result(timeout=wait)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()
    assert not ready(grpc.insecure_channel(target))
    assert not ready(grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca)))
    assert ready(grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert)), wait=30)
