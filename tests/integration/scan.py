"""Where a secret could be recorded, read back from the real servers: every MLflow run's params and tags (its
datasets' sources too), every text artifact in MLflow's store, the registry's versions, the published
manifests, Prefect's flow runs (names, and parameters when asked), artifacts and logs, and the stack's log
files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mlflow.tracking import MlflowClient

from infra.stack.prefect_api import prefect_http
from infra.storage.s3 import s3_client
from tests.integration.conftest import Stack

TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".csv", ".log")


def bucket_texts(stack: Stack, bucket: str) -> list[tuple[str, str]]:
    """Every text object of ``bucket``, read straight from S3, several at a time."""
    client = s3_client(stack.settings)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", []) if o["Key"].endswith(TEXT_SUFFIXES)]

    def read(key: str) -> tuple[str, str]:
        return f"s3://{bucket}/{key}", client.get_object(Bucket=bucket, Key=key)["Body"].read().decode(
            errors="replace")
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(read, keys))


def _paged(api, path: str) -> list[dict]:
    rows, offset = [], 0
    while True:
        page = api.post(path, json={"limit": 200, "offset": offset}).json()
        rows += page
        if len(page) < 200:
            return rows
        offset += 200


def haystacks(stack: Stack, cli_output: str, *, flow_parameters: bool = True) -> list[tuple[str, str]]:
    """(where, text) of every recorded copy the stack holds. ``flow_parameters``: Prefect's flow-run parameters
    too (a run's dataset URL is its parameter, kept whole for the run to use: docs/reliability.md)."""
    found: list[tuple[str, str]] = [("cli output", cli_output)]
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    assert runs
    found += [(f"run {run.info.run_id} params/tags/datasets", repr(run.data.params) + repr(run.data.tags) +
               repr([d.dataset.source for d in run.inputs.dataset_inputs])) for run in runs]
    found += bucket_texts(stack, stack.settings.mlflow_bucket)
    found += bucket_texts(stack, stack.settings.model_bucket)  # the published manifests
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            found.append((f"model {model.name} v{version.version}", repr(version.tags) + str(version.description)))
    with prefect_http(stack.settings) as api:
        flow_runs = _paged(api, "/flow_runs/filter")
        assert flow_runs
        found += [(f"flow run {r['id']} name", r["name"]) for r in flow_runs]
        if flow_parameters:
            found += [(f"flow run {r['id']} parameters", repr(r["parameters"])) for r in flow_runs]
        found += [(f"prefect artifact {a['id']}", repr(a.get("data")) + repr(a.get("description")))
                  for a in _paged(api, "/artifacts/filter")]
        found += [(f"prefect log {log['id']}", log["message"]) for log in _paged(api, "/logs/filter")]
    for log_file in (stack.home / "logs").glob("*.log"):  # the servers' logs
        found.append((str(log_file), log_file.read_text(errors="replace")))
    return found


def find_secrets(stack: Stack, secrets: list[str], cli_output: str, *, flow_parameters: bool = True) -> list[str]:
    """Where any of ``secrets`` is recorded (empty: nowhere)."""
    assert secrets and all(secrets)
    found = haystacks(stack, cli_output, flow_parameters=flow_parameters)
    assert len(found) > 20  # the scan really looked at things
    return [where for where, text in found for secret in secrets if secret in text]
