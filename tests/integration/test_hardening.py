"""Hardening against the real stack: the registered-model creation race, champions whose objects are
missing or corrupt, run leases, S3 credentials kept out of what Ray pickles, and the private state directory
of a running stack. docs/reliability.md has a row for each."""

from __future__ import annotations

import json
import pickle
import secrets
import stat
import threading
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from infra.s3 import RunBusyError, RunLease, ray_storage, s3_client
from infra.tracking import register_version
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
        assert time.monotonic() - started < 3  # refused, not queued
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
    path, filesystem = ray_storage(stack.settings, "ray")
    blob = pickle.dumps(filesystem)
    assert secret.get_secret_value().encode() not in blob
    assert (stack.settings.aws_access_key_id and
            stack.settings.aws_access_key_id.get_secret_value().encode() not in blob)
    # and the filesystem still works, with credentials from the environment
    restored = pickle.loads(blob)  # noqa: S301 - our own bytes
    restored.create_dir(f"{path}/pickle-check")
    assert restored.get_file_info(path).type.name == "Directory"


def test_the_running_stacks_state_directory_is_private(stack: Stack) -> None:
    home = stack.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    # Two servers set modes of their own, whatever the umask: Ray on its temp dir (sockets, session logs)
    # and SeaweedFS on its volume-info files (*.vif, 0644); the 0700 home around them keeps other users out
    loose = [str(p.relative_to(home)) for p in home.rglob("*")
             if not p.is_symlink() and p.relative_to(home).parts[0] != "ray" and p.suffix != ".vif"
             and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == [], loose[:20]
    assert stat.S_IMODE((home / "env").stat().st_mode) == 0o600
