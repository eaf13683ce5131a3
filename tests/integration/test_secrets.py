"""No credential leaks: after the end-to-end run (and whatever ran before it), the stack's credentials appear in
no MLflow param, tag, artifact or registry entry, no published manifest, no Prefect parameter, artifact or log,
and no log file of the stack (the 0600 env/stack.json files that hold them on purpose excepted). The web
dataset test scans the same places for a dataset URL's credentials and signed query string."""

from __future__ import annotations

from tests.integration.conftest import Stack
from tests.integration.scan import bucket_texts, find_secrets


def test_no_secret_in_mlflow_prefect_or_logs(stack: Stack, e2e_run: dict[str, str]) -> None:
    secrets = stack.stack.secrets()
    assert len(secrets) >= 5  # S3 keys, Prefect's auth string, MLflow's admin password, Ray's token, JWT keys
    # the store holds the e2e run's artifacts: the scan reads real ones
    assert any(e2e_run["run_id"] in where for where, _ in bucket_texts(stack, stack.settings.mlflow_bucket))
    leaks = find_secrets(stack, secrets, e2e_run["stdout"])
    assert not leaks, f"credentials found in: {leaks[:10]}"
