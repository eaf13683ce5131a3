"""Hardening against the real stack: the registered-model creation race, champions whose objects are
missing or corrupt, run leases, S3 credentials kept out of what Ray pickles, and the private state directory
of a running stack, the Prefect API's authentication. docs/reliability.md has a row for each."""

from __future__ import annotations

import json
import os
import pickle
import secrets
import stat
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from infra.stack.prefect_api import auth_header, prefect_http
from infra.storage.checkpoints import prune_checkpoints, ray_storage
from infra.storage.leases import RunBusyError, RunLease
from infra.storage.s3 import s3_client
from infra.tracking.runs import register_version, start_run
from models.data import ArraySplit
from tasks.promote import PROMOTED, PromotionPolicy, decide, score_champion
from tests.integration.conftest import Stack


def test_two_first_runs_of_a_new_model_name_both_register(stack: Stack) -> None:
    """16 writers release together on a name nobody has created: every one gets its version, none sees
    RESOURCE_ALREADY_EXISTS."""
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("registry-race") or client.get_experiment(
        client.create_experiment("registry-race"))
    name = f"race-{secrets.token_hex(4)}"
    runs = [client.create_run(exp.experiment_id).info.run_id for _ in range(16)]
    barrier = threading.Barrier(len(runs))
    versions: list[str] = []
    errors: list[BaseException] = []

    def register(run_id: str) -> None:
        barrier.wait()
        try:
            versions.append(register_version(uri, name, f"runs:/{run_id}/model", run_id))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(run_id,)) for run_id in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], [str(e)[:200] for e in errors]
    assert sorted(map(int, versions)) == list(range(1, 17))


def test_runs_that_start_together_on_a_new_experiment_all_start_in_it(stack: Stack) -> None:
    """8 runs start at once on an experiment nobody has created: the creates race, the losers read the
    winner's experiment, and every run lands in that one experiment."""
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    name = f"exp-race-{secrets.token_hex(4)}"
    barrier = threading.Barrier(8)
    runs: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            runs.append(start_run(uri, name, "race").run_id)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], [str(e)[:200] for e in errors]
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == name]
    assert sorted(r.info.run_id for r in client.search_runs([experiment.experiment_id])) == sorted(runs)
    assert len(runs) == 8


def _put_model(stack: Stack, prefix: str, weights: bytes, sha256: str) -> str:
    client = s3_client(stack.settings)
    bucket = stack.settings.model_bucket
    client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=weights)
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(
        {"sha256": sha256, "weights": "model.safetensors", "class_names": ["a", "b"], "image_size": 32}).encode())
    return f"s3://{bucket}/{prefix}/"


def test_a_champion_with_missing_or_corrupt_objects_is_replaced_and_the_reason_recorded(stack: Stack) -> None:
    test = ArraySplit(np.zeros((4, 3, 32, 32), dtype=np.uint8), np.array([0, 1, 0, 1]))
    prefix = f"broken-champion-{secrets.token_hex(3)}"
    missing = f"s3://{stack.settings.model_bucket}/{prefix}/gone/"
    corrupt = _put_model(stack, f"{prefix}/corrupt", b"\x00" * 64, "0" * 64)
    for source, why in ((missing, "no published model at"), (corrupt, "sha256 mismatch")):
        scored = score_champion(source, test, "digest", ["a", "b"], "test_accuracy", stack.settings)
        assert scored.score is None and scored.unusable and why in scored.unusable, scored
        decision = decide(PromotionPolicy("if-better"), "2", 0.1, "1", scored.score, scored.incomparable,
                          scored.test_data, scored.unusable)
        assert decision.outcome == PROMOTED and "champion v1 is unusable" in decision.reason
        assert why in decision.as_tags()["champion_unusable"]
    # S3 down is not a verdict on the champion: the task fails (and retries) without deciding
    down = stack.settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(Exception, match="unreachable"):
        score_champion(corrupt, test, "digest", ["a", "b"], "test_accuracy", down)


def test_a_run_lease_refuses_a_second_holder_renews_itself_and_is_taken_over_when_its_holder_died(
        stack: Stack) -> None:
    client, bucket = s3_client(stack.settings), stack.settings.checkpoint_bucket
    run_id = secrets.token_hex(16)
    first = RunLease(client, bucket, run_id, "first", stack.settings.s3_endpoint_url, ttl_s=1.5)
    first.acquire()
    try:
        time.sleep(2.5)  # past the TTL: only the renewals keep it
        started = time.monotonic()
        with pytest.raises(RunBusyError, match=f"MLflow run {run_id} is already being trained by first"):
            RunLease(client, bucket, run_id, "second", stack.settings.s3_endpoint_url, ttl_s=1.5).acquire()
        # refused, not queued: a queued one would wait for a TTL that the renewals push back forever
        assert time.monotonic() - started < 10
        first.check()
    finally:
        first.release()
    with RunLease(client, bucket, run_id, "third", stack.settings.s3_endpoint_url):
        pass  # free again once released
    # a holder on this host whose process is gone (a crashed driver) is taken over at once
    dead = {"owner": "crashed", "host": __import__("socket").gethostname(), "pid": 2**22 + 7,
            "expires_at": time.time() + 3600}
    client.put_object(Bucket=bucket, Key=f".run-leases/{run_id}.lease", Body=json.dumps(dead).encode())
    with RunLease(client, bucket, run_id, "rescuer", stack.settings.s3_endpoint_url):
        pass


def test_ray_gets_no_s3_secret_in_what_it_pickles(stack: Stack) -> None:
    secret = stack.settings.aws_secret_access_key
    assert secret
    saved = dict(os.environ)
    try:  # ray_storage exports the stack's variables into this process, as a driver needs: not for later tests
        path, filesystem = ray_storage(stack.settings, "ray")
        blob = pickle.dumps(filesystem)
        assert secret.get_secret_value().encode() not in blob
        assert (stack.settings.aws_access_key_id and
                stack.settings.aws_access_key_id.get_secret_value().encode() not in blob)
        # and the filesystem still works, with credentials from the environment
        restored = pickle.loads(blob)  # noqa: S301 - our own bytes
        restored.create_dir(f"{path}/pickle-check")
        assert restored.get_file_info(path).type.name == "Directory"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_running_stacks_state_directory_is_private(stack: Stack) -> None:
    home = stack.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    # Two servers set modes of their own, whatever the umask: Ray on its temp dirs (sockets, session logs)
    # and SeaweedFS on its volume-info files (*.vif, 0644); the 0700 home around them keeps other users out
    ray_dirs = {d.name for d in stack.stack.ray_temp_dirs if d.parent == home}  # the nodes' and the driver node's
    loose = [str(p.relative_to(home)) for p in home.rglob("*")
             if not p.is_symlink() and p.relative_to(home).parts[0] not in ray_dirs and p.suffix != ".vif"
             and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == [], loose[:20]
    assert stat.S_IMODE((home / "env").stat().st_mode) == 0o600


def test_the_prefect_api_needs_the_stacks_auth_string_and_a_csrf_token(stack: Stack) -> None:
    """Without the auth string every API call but the health probe is refused (401); with it, a state
    change still needs a CSRF token (403 without); a browser on another origin gets no CORS grant; and the
    UI itself is served and asks for the login."""
    api = f"{stack.stack.prefect_url}/api"
    secret = stack.settings.prefect_api_auth_string
    assert secret and secret.get_secret_value() == stack.stack.prefect_auth
    assert f"PREFECT_API_AUTH_STRING={stack.stack.prefect_auth}" in stack.stack.env_file.read_text()
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200  # probes stay open
    assert httpx.get(f"{api}/work_pools/{stack.settings.work_pool}", timeout=10).status_code == 401
    assert httpx.get(f"{api}/csrf-token", params={"client": "x"}, timeout=10).status_code == 401  # no token
    assert httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, timeout=10).status_code == 403  # so no POST
    wrong = auth_header("headbench:not-the-string")
    assert httpx.get(f"{api}/work_pools/{stack.settings.work_pool}", headers=wrong, timeout=10).status_code == 401
    right = auth_header(secret.get_secret_value())
    assert httpx.get(f"{api}/work_pools/{stack.settings.work_pool}", headers=right, timeout=10).status_code == 200
    no_csrf = httpx.post(f"{api}/flow_runs/filter", json={"limit": 1}, headers=right, timeout=10)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    with prefect_http(stack.settings) as client:
        assert client.post("/flow_runs/filter", json={"limit": 1}).status_code == 200
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    evil = httpx.options(f"{api}/flow_runs/filter", headers={"Origin": "http://evil.example", **preflight},
                         timeout=10)
    assert "access-control-allow-origin" not in evil.headers
    ours = httpx.options(f"{api}/flow_runs/filter", headers={"Origin": stack.stack.prefect_url, **preflight},
                         timeout=10)
    assert ours.headers.get("access-control-allow-origin") == stack.stack.prefect_url
    assert httpx.get(stack.stack.prefect_url, timeout=10).status_code == 200  # the dashboard's page
    ui = httpx.get(f"{stack.stack.prefect_url}/ui-settings", timeout=10).json()
    assert ui["auth"] == "BASIC" and ui["csrf_enabled"] is True


def test_checkpoint_pruning_keeps_the_newest_folders_and_rays_run_state(stack: Stack) -> None:
    client, bucket = s3_client(stack.settings), stack.settings.checkpoint_bucket
    run = f"ray/prune-{secrets.token_hex(4)}"
    names = ["checkpoint_2026-12-01_10-00-00.000001", "checkpoint_2026-12-01_10-00-05.000001",
             "checkpoint_2026-12-01_10-00-09.000001"]
    for name in names:  # written in this order: LastModified grows (1 s resolution: a pause between)
        for file in ("model.safetensors", "train_state.pt"):
            client.put_object(Bucket=bucket, Key=f"{run}/{name}/{file}", Body=b"x")
        time.sleep(1.1)
    client.put_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json", Body=b"{}")

    def left() -> list[str]:
        return sorted(o["Key"][len(run) + 1:] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{run}/")
                      .get("Contents", []))

    assert prune_checkpoints(client, bucket, run, 2, None) == names[:1]
    assert left() == sorted(["checkpoint_manager_snapshot.json"] + [f"{n}/{f}" for n in names[1:]
                                                                    for f in ("model.safetensors", "train_state.pt")])
    assert prune_checkpoints(client, bucket, run, 2, None) == []
    assert prune_checkpoints(client, bucket, run, 0, None) == names[1:]
    assert left() == ["checkpoint_manager_snapshot.json"]


UPLOAD_MEMORY = r'''
import json, sys, tempfile, threading, time
from pathlib import Path
import psutil, torch
from pyarrow import fs
from infra.storage.checkpoints import ray_storage
from infra.settings import load_settings

def uss() -> float:
    return psutil.Process().memory_full_info().uss / 2**20

folder = Path(tempfile.mkdtemp())
torch.save({"weights": torch.randn(12_000_000)}, folder / "weights.pt")  # 48 MB
torch.save({"momentum": torch.randn(24_000_000)}, folder / "train_state.pt")  # 96 MB: a ResNet-18 checkpoint's size
settings = load_settings()
path, s3 = ray_storage(settings, "upload-memory")
before, peak, done = uss(), [0.0], threading.Event()

def sample() -> None:
    while not done.is_set():
        peak[0] = max(peak[0], uss())
        time.sleep(0.02)

sampler = threading.Thread(target=sample)
sampler.start()
fs.copy_files(str(folder), f"{path}/{time.time()}", destination_filesystem=s3)  # what Ray Train does per epoch
done.set()
sampler.join()
print(json.dumps({"growth_mb": peak[0] - before}))
'''


def test_a_checkpoint_upload_streams_part_by_part_instead_of_holding_the_files_in_memory(stack: Stack) -> None:
    """Rank 0 uploads each epoch's checkpoint through ``ray_storage``'s filesystem: with Arrow's background
    writes the whole 144 MB sat in the worker's memory (+140-165 MB of USS, kept by Arrow's pool)."""
    done = subprocess.run([sys.executable, "-c", UPLOAD_MEMORY], capture_output=True, text=True, timeout=300,
                          check=False, env=stack.cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 80, growth
