"""The stack on PostgreSQL (127.0.0.1:5432, trust auth): MLflow's backend store and Prefect's database in
their own fresh databases; an end-to-end retrain lands in both; SQLite stays the default (every other test)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from infra.procs import cmdline
from infra.settings import load_settings
from infra.stack import LocalStack, free_ports

HEADBENCH = str(Path(sys.executable).parent / "headbench")
SERVER = "postgresql://postgres@127.0.0.1:5432"


async def _sql(database: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(f"{SERVER}/{database}", timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    name = f"hbtest_{secrets.token_hex(4)}"
    home = tmp_path_factory.mktemp("pgstack")
    stack = LocalStack(load_settings(home), free_ports(), backend="postgres", database_url=f"{SERVER}/{name}")
    try:
        stack.up(timeout=240)
        yield stack
    finally:
        stack.down()
        for service in ("mlflow", "prefect"):
            asyncio.run(_sql("postgres", f'DROP DATABASE IF EXISTS "{name}_{service}" WITH (FORCE)'))


@pytest.mark.slow
def test_retrain_end_to_end_on_postgres(pg_stack: LocalStack) -> None:
    # A private Ray: the shared stack's Ray nodes hold that stack's S3 credentials in their environment, not
    # this stack's (nodes get their credentials from their environment, never through the object store)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "RAY_"))}
    env |= {"HEADBENCH_HOME": str(pg_stack.home)}
    done = subprocess.run([HEADBENCH, "run", "--classes", "0-1", "--limit", "80", "--test-limit", "40",
                           "--image-size", "32", "--epochs", "1", "--batch-size", "32", "--workers", "1",
                           "--model-name", "pg-test"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = done.stdout.split("MLflow run : ", 1)[1].split()[0].rsplit("/", 1)[-1]

    mlflow_db = pg_stack.database("mlflow").rpartition("/")[2]
    prefect_db = pg_stack.database("prefect").rpartition("/")[2]
    runs = asyncio.run(_sql(mlflow_db, "SELECT status FROM runs WHERE run_uuid = $1", run_id))
    assert [r["status"] for r in runs] == ["FINISHED"]
    versions = asyncio.run(_sql(mlflow_db, "SELECT version FROM model_versions WHERE name = 'pg-test'"))
    assert [r["version"] for r in versions] == [1]
    flows = asyncio.run(_sql(prefect_db, "SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                                         "WHERE f.name = 'retrain'"))
    assert [str(r["state_type"]) for r in flows] == ["COMPLETED"]
    assert not (pg_stack.home / "mlflow" / "mlflow.db").exists()  # nothing went to SQLite
    assert not (pg_stack.home / "prefect" / "prefect.db").exists()
    # the database URL is kept in the 0600 state file, not passed on any command line
    for pid_file in (pg_stack.home / "pids").glob("*.pid"):
        assert "postgresql" not in cmdline(int(pid_file.read_text()))
