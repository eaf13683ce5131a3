"""No credential leaks: after the end-to-end run (and whatever ran before it), the stack's S3 keys appear in
no MLflow param, tag, artifact or registry entry, no Prefect parameter or log, and no log file of the stack
(the 0600 env/stack.json files that hold them on purpose excepted)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mlflow.tracking import MlflowClient

from infra.prefect_api import prefect_http
from infra.s3 import s3_client
from tests.integration.conftest import Stack

TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".csv", ".log")


def _artifact_texts(stack: Stack) -> list[tuple[str, str]]:
    """Every text object in MLflow's artifact store (the S3 bucket MLflow's server writes to): each run's
    and each logged model's artifacts, read straight from S3, several at a time."""
    client = s3_client(stack.settings)
    bucket = stack.settings.mlflow_bucket
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", []) if o["Key"].endswith(TEXT_SUFFIXES)]

    def read(key: str) -> tuple[str, str]:
        return f"artifact s3://{bucket}/{key}", client.get_object(Bucket=bucket, Key=key)["Body"].read().decode(
            errors="replace")
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(read, keys))


def test_no_secret_in_mlflow_prefect_or_logs(stack: Stack, e2e_run: dict[str, str]) -> None:
    secrets = [s for s in (stack.stack.access_key, stack.stack.secret_key, stack.stack.prefect_auth) if s]
    assert len(secrets) == 3
    haystacks: list[tuple[str, str]] = [("cli output", e2e_run["stdout"])]

    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    assert runs
    haystacks += [(f"run {run.info.run_id} params/tags", repr(run.data.params) + repr(run.data.tags))
                  for run in runs]
    artifacts = _artifact_texts(stack)
    assert any(e2e_run["run_id"] in where for where, _ in artifacts)  # the store holds the e2e run's artifacts
    haystacks += artifacts
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            haystacks.append((f"model {model.name} v{version.version}", repr(version.tags) + str(version.description)))

    with prefect_http(stack.settings) as api:
        flow_runs = api.post("/flow_runs/filter", json={"limit": 200}).json()
        assert flow_runs
        haystacks += [(f"flow run {r['id']} parameters", repr(r["parameters"])) for r in flow_runs]
        offset = 0
        while True:
            logs = api.post("/logs/filter", json={"limit": 200, "offset": offset}).json()
            haystacks += [(f"prefect log {log['id']}", log["message"]) for log in logs]
            if len(logs) < 200:
                break
            offset += 200
    for log_file in (stack.home / "logs").glob("*.log"):  # the servers' logs
        haystacks.append((str(log_file), log_file.read_text(errors="replace")))

    leaks = [where for where, text in haystacks for secret in secrets if secret in text]
    assert not leaks, f"credentials found in: {leaks[:10]}"
    assert len(haystacks) > 20  # the scan really looked at things
