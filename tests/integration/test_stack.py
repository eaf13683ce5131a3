"""`headbench up | status | run | down` as a user runs them on a stack of their own: idempotent, loopback only,
stops exactly what it started, with a two-node Ray cluster (`--ray-nodes 2`) among the services and MLflow's and
Prefect's stores in the stack's own PostgreSQL server (`--backend postgres`; SQLite, the default, is every other
test's). Nothing here reaches a PostgreSQL server the stack did not start."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest

from infra.processes.supervise import LOOPBACK_IPS, cmdline, free_port, group_members, listening, pid_alive
from infra.settings import Settings, StackPorts
from infra.stack.local import LocalStack
from infra.stack.postgres import data_dir
from infra.stack.ray_nodes import alive_nodes
from tests.conftest import env_without_stack
from tests.integration.conftest import run_id_of

HEADBENCH = str(Path(sys.executable).parent / "headbench")


async def _sql(server: str, database: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(f"{server}/{database}", timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def sql(server: str, database: str, query: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(_sql(server, database, query, *args))


def _listening(pid_group: int) -> list[tuple[str, int]]:
    """(ip, port) of the TCP sockets listened on by processes of one process group."""
    return listening(group_members(pid_group))


SERVICES = {"postgres": "postgres", "s3": "weed", "mlflow": "mlflow", "prefect": "prefect", "worker": "worker",
            "ray-head": "--head", "ray-node-1": "infra.stack.ray_nodes",
            "ray-driver": "infra.stack.ray_nodes"}  # service -> a word of its argv


@pytest.mark.training
def test_up_status_run_down_lifecycle_on_postgresql(tmp_path: Path) -> None:
    # nothing of the session's stack: its run would otherwise train on that stack's cluster (RAY_ADDRESS)
    env = env_without_stack() | {"HEADBENCH_HOME": str(tmp_path), "COLUMNS": "200"}
    env = {k: v for k, v in env.items() if not k.startswith(("PG", "HEADBENCH_DATABASE_URL"))}  # no other server
    env |= {f"HEADBENCH_PORT_{port.upper()}": str(free_port()) for port in StackPorts.model_fields}
    port = env["HEADBENCH_PORT_POSTGRES"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([HEADBENCH, *args], capture_output=True, text=True, env=env, timeout=300, check=False)

    try:
        first = cli("up", "--backend", "postgres", "--ray-nodes", "2", "--ray-cpus", "1,1")
        assert first.returncode == 0, first.stdout + first.stderr
        # this long home's Ray nodes keep their sockets in a private mkdtemp folder, which `down` removes
        ray_private = LocalStack(Settings(home=tmp_path)).ray_temp_dirs[0].parent
        assert ray_private.parent == Path(tempfile.gettempdir()) and (ray_private / "n").is_dir()
        shown = f"postgresql://headbench:***@127.0.0.1:{port}/headbench"
        assert f"stores     : PostgreSQL {shown}_mlflow, {shown}_prefect" in first.stdout
        gcs, dashboard = env["HEADBENCH_PORT_RAY_GCS"], env["HEADBENCH_PORT_RAY_DASHBOARD"]
        assert f"Ray cluster: RAY_ADDRESS=127.0.0.1:{gcs}, 2 node(s), CPUs 1,1" in first.stdout
        assert f"MLflow UI  : http://127.0.0.1:{env['HEADBENCH_PORT_MLFLOW']}" in first.stdout
        assert f"Prefect UI : http://127.0.0.1:{env['HEADBENCH_PORT_PREFECT']}" in first.stdout
        again = cli("up")  # remembers --backend and --ray-nodes
        assert again.returncode == 0 and again.stdout.count("already running") == 8, again.stdout
        state = json.loads((tmp_path / "stack.json").read_text())
        token, password = state["ray_token"], state["pg_password"]
        server = f"postgresql://headbench:{password}@127.0.0.1:{port}"
        # the stores' server is the stack's own: its port, its data folder, scram logins only
        assert sql(server, "postgres", "SELECT inet_server_port() AS p, current_setting('data_directory') AS d, "
                                       "current_setting('password_encryption') AS e")[0][:] == (
            int(port), str(data_dir(tmp_path)), "scram-sha-256")
        hba = sql(server, "postgres", "SELECT DISTINCT auth_method FROM pg_hba_file_rules")
        assert [r["auth_method"] for r in hba] == ["scram-sha-256"]  # no trust line, for any address
        for login in (f"postgresql://headbench@127.0.0.1:{port}", f"postgresql://headbench:wrong@127.0.0.1:{port}",
                      f"postgresql://postgres@127.0.0.1:{port}"):
            with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
                sql(login, "postgres", "SELECT 1")
        assert password not in cmdline(int((tmp_path / "pids" / "postgres.pid").read_text()))
        assert alive_nodes(f"http://127.0.0.1:{dashboard}") == {}  # the dashboard refuses a caller without it
        nodes = alive_nodes(f"http://127.0.0.1:{dashboard}", token=token)
        assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2  # two raylets, two node ids

        env_file = tmp_path / "env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        exported = dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines())
        assert exported["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{env['HEADBENCH_PORT_MLFLOW']}"
        assert exported["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{env['HEADBENCH_PORT_S3']}"
        assert exported["PREFECT_API_URL"] == f"http://127.0.0.1:{env['HEADBENCH_PORT_PREFECT']}/api"
        assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= exported.keys()
        assert exported["RAY_ADDRESS"] == f"127.0.0.1:{gcs}" and exported["HEADBENCH_RAY_TEMP_DIR"]

        status = cli("status")
        assert status.returncode == 0 and status.stdout.count("healthy") == 8, status.stdout

        pids = {name: int((tmp_path / "pids" / f"{name}.pid").read_text()) for name in SERVICES}
        for service, pid in pids.items():
            addresses = _listening(pid)
            assert addresses, service
            assert all(ip in LOOPBACK_IPS for ip, _ in addresses), (service, addresses)
            assert "postgresql:" not in cmdline(pid)  # the database URL stays in the 0600 state file

        # a retrain on this stack trains on its cluster and lands in both PostgreSQL databases, none in SQLite
        run = cli("run", "--classes", "0-1", "--limit", "80", "--test-limit", "40", "--image-size", "32",
                  "--epochs", "1", "--batch-size", "32", "--workers", "1", "--model-name", "pg-test")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        run_id = run_id_of(run.stdout.split("MLflow run : ", 1)[1].split()[0])
        runs = sql(server, "headbench_mlflow", "SELECT status FROM runs WHERE run_uuid = $1", run_id)
        assert [r["status"] for r in runs] == ["FINISHED"]
        versions = sql(server, "headbench_mlflow", "SELECT version FROM model_versions WHERE name = 'pg-test'")
        assert [r["version"] for r in versions] == [1]
        flows = sql(server, "headbench_prefect", "SELECT fr.state_type FROM flow_run fr JOIN flow f ON "
                                                 "f.id = fr.flow_id WHERE f.name = 'retrain'")
        assert [str(r["state_type"]) for r in flows] == ["COMPLETED"]
        assert not (tmp_path / "mlflow" / "mlflow.db").exists() and not (tmp_path / "prefect" / "prefect.db").exists()

        # --database-url names an external server instead: its databases <name>_mlflow/_prefect are created
        external = LocalStack(Settings(home=tmp_path / "external"), backend="postgres",
                              database_url=f"{server}/team")
        assert not external.own_postgres and external.postgres_services() == []
        external._create_databases()
        names = sql(server, "postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'team%' ORDER BY 1")
        assert [r["datname"] for r in names] == ["team_mlflow", "team_prefect"]
    finally:
        down = cli("down")
    # the worker first, then Ray's driver and worker nodes before the head that holds its GCS; the stores last
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: worker, ray-driver, ray-node-1, ray-head, prefect, mlflow, s3, postgres" in down.stdout
    for service, pid in pids.items():
        assert not pid_alive(pid, SERVICES[service]), service
        assert _listening(pid) == []
    after = cli("status")
    assert after.returncode == 3 and after.stdout.count("stopped") == 8
    assert not ray_private.exists()
    # the server started again on its data folder (what the next `up` starts first) still has the run
    stack = LocalStack(Settings(home=tmp_path), StackPorts(**{p: int(env[f"HEADBENCH_PORT_{p.upper()}"])
                                                              for p in StackPorts.model_fields}))
    try:
        stack._start_all(stack.postgres_services(), timeout=60, on_ready=None)
        assert [r["status"] for r in sql(server, "headbench_mlflow", "SELECT status FROM runs")] == ["FINISHED"]
    finally:
        assert stack._stop(stack.postgres_services()) == ["postgres"]
