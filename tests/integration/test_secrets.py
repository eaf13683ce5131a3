"""No credential leaks: after the end-to-end run (and whatever ran before it), the stack's S3 keys appear in
no MLflow param, tag, artifact or registry entry, no Prefect parameter or log, and no log file of the stack
(the 0600 env/stack.json files that hold them on purpose excepted)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from infra.prefect_api import prefect_http
from tests.integration.conftest import Stack

TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".csv", ".log")


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path or None):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_no_secret_in_mlflow_prefect_or_logs(stack: Stack, e2e_run: dict[str, str]) -> None:
    secrets = [s for s in (stack.stack.access_key, stack.stack.secret_key, stack.stack.prefect_auth) if s]
    assert len(secrets) == 3
    haystacks: list[tuple[str, str]] = [("cli output", e2e_run["stdout"])]

    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    assert runs
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            haystacks.append((f"run {run.info.run_id} params/tags", repr(run.data.params) + repr(run.data.tags)))
            for path in _artifacts(client, run.info.run_id):
                if path.endswith(TEXT_SUFFIXES):
                    local = client.download_artifacts(run.info.run_id, path, tmp)
                    haystacks.append((f"artifact {run.info.run_id}/{path}", Path(local).read_text(errors="replace")))
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
    for log_file in (stack.home / "logs").glob("*.log"):
        haystacks.append((str(log_file), log_file.read_text(errors="replace")))

    leaks = [where for where, text in haystacks for secret in secrets if secret in text]
    assert not leaks, f"credentials found in: {leaks[:10]}"
    assert len(haystacks) > 20  # the scan really looked at things
