"""infra/stack/local.py without its servers: the cluster shape options, the env a stack exports, the port check,
credentials kept out of error messages, and the start order (with stand-in processes)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from infra.uris import redact_url


@pytest.mark.parametrize("kwargs, message", [
    ({"ray_nodes": 17}, "--ray-nodes 17 is out of range; allowed: 0 (a private Ray per run) to 16"),
    ({"ray_nodes": -1}, "--ray-nodes -1 is out of range"),
    ({"ray_nodes": 2, "ray_cpus": 0}, "--ray-cpus 0 is out of range; allowed: 1 to 1024 CPUs per node"),
    ({"ray_nodes": 2, "ray_cpus": "2,0"}, "--ray-cpus 2,0 is out of range; allowed: 1 to 1024 CPUs per node"),
    ({"ray_nodes": 3, "ray_cpus": "2,1"}, "--ray-cpus 2,1 names 2 nodes but --ray-nodes is 3; give one count, or "
                                          "one per node"),
    ({"ray_nodes": 2, "ray_cpus": "two"}, "--ray-cpus 'two' is not a CPU count or a comma list of them"),
])
def test_bad_cluster_shape_is_one_line(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack
    from infra.stack.services import StackError

    with pytest.raises(StackError, match=re.escape(message)):
        LocalStack(load_settings(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_cpus_per_node_one_for_all_or_one_each_head_first(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    for option, expected in (("2,1", [2, 1]), ("3", [3, 3]), ([1, 2], [1, 2])):
        stack = LocalStack(load_settings(tmp_path), free_ports(), ray_nodes=2, ray_cpus=option)
        assert stack.ray_node_cpus == expected
        head, node, driver = stack.ray_services()
        assert f"--num-cpus={expected[0]}" in head.argv and f"--num-cpus={expected[1]}" in node.argv
        assert "--num-cpus=0" in driver.argv  # the driver node holds no training worker


def test_cluster_shape_defaults_to_an_even_share_and_exports_ray_address(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    stack = LocalStack(load_settings(tmp_path), free_ports(), ray_nodes=2)
    assert stack.ray_node_cpus == [max(1, (os.cpu_count() or 1) // 2)] * 2
    assert [s.name for s in stack.services()][-4:] == ["ray-head", "ray-node-1", "ray-driver", "worker"]
    plain = LocalStack(load_settings(tmp_path / "plain"), free_ports())
    for s in (stack, plain):
        s.access_key, s.secret_key = "k", "s"
    assert stack.standard_env()["RAY_ADDRESS"] == f"127.0.0.1:{stack.ports.ray_gcs}"
    assert stack.worker_env()["RAY_ADDRESS"] == stack.standard_env()["RAY_ADDRESS"]  # deployed runs use it
    # drivers on this host attach to the 0-CPU driver node, which has a temp dir of its own
    driver_dir = stack.standard_env()["HEADBENCH_RAY_TEMP_DIR"]
    assert stack.worker_env()["HEADBENCH_RAY_TEMP_DIR"] == driver_dir
    assert f"--temp-dir={driver_dir}" in stack.ray_services()[-1].argv
    assert f"--temp-dir={stack.ray_temp_dirs[0]}" in stack.ray_services()[0].argv and \
        stack.ray_temp_dirs[0] != Path(driver_dir)
    assert "RAY_ADDRESS" not in plain.worker_env() and "ray-head" not in [s.name for s in plain.services()]
    assert "HEADBENCH_RAY_TEMP_DIR" not in plain.standard_env()


def test_another_cluster_shape_forgets_the_saved_cpus_per_node(tmp_path: Path) -> None:
    import json

    from infra.settings import load_settings
    from infra.stack.local import LocalStack

    (tmp_path / "stack.json").write_text(json.dumps({"ports": {}, "ray_nodes": 2, "ray_cpus": [1, 1]}))
    assert LocalStack(load_settings(tmp_path)).ray_node_cpus == [1, 1]  # the saved shape, as saved
    assert LocalStack(load_settings(tmp_path), ray_nodes=0).ray_nodes == 0  # no longer refused for 1,1
    assert len(LocalStack(load_settings(tmp_path), ray_nodes=3).ray_node_cpus) == 3


def test_a_port_held_by_another_program_is_named_with_its_setting(tmp_path: Path) -> None:
    from infra.processes.supervise import HOST
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports
    from infra.stack.services import StackError

    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        ports = free_ports().model_copy(update={"ray_gcs": holder.getsockname()[1]})
        stack = LocalStack(load_settings(tmp_path), ports, ray_nodes=2)
        with pytest.raises(StackError, match=f"ray-head: port {ports.ray_gcs} on 127.0.0.1 is in use by another "
                                             "program; choose a free one with HEADBENCH_PORT_RAY_GCS=PORT"):
            stack._check_ports(next(spec for spec in stack.services() if spec.name == "ray-head"))



def test_the_port_setting_the_busy_port_error_names_moves_that_port_of_a_saved_stack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `up` failed on a busy port the stack is saved; the variable the error names must still apply."""
    import json

    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    saved = free_ports()
    (tmp_path / "stack.json").write_text(json.dumps({"ports": saved.all(), "ray_nodes": 2}))
    monkeypatch.setenv("HEADBENCH_PORT_RAY_DASHBOARD", "18265")
    ports = LocalStack(load_settings(tmp_path)).ports
    assert ports.ray_dashboard == 18265
    assert ports.all() | {"ray_dashboard": saved.ray_dashboard} == saved.all()  # every other port as saved

@pytest.mark.parametrize("url, shown", [
    ("postgresql://hb:s3cr%40t@127.0.0.1:6543/headbench", "postgresql://hb:***@127.0.0.1:6543/headbench"),
    ("postgresql://hb@127.0.0.1/headbench", "postgresql://hb@127.0.0.1/headbench"),  # no password: unchanged
    ("postgresql://127.0.0.1:6543/headbench", "postgresql://127.0.0.1:6543/headbench"),
    ("postgresql://u:p@ss:word@host/db", "postgresql://u:***@host/db"),  # the last @ ends the credentials
])
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_postgres_databases_are_one_per_server_and_the_url_stays_off_argv(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    stack = LocalStack(load_settings(tmp_path), free_ports(), backend="postgres",
                       database_url="postgresql://hb:secret@127.0.0.1:6543/hbtest")
    assert stack.database("mlflow") == "postgresql://hb:secret@127.0.0.1:6543/hbtest_mlflow"
    assert stack.prefect_store == "postgresql+asyncpg://hb:secret@127.0.0.1:6543/hbtest_prefect"
    stack.access_key, stack.secret_key = "k", "s"
    assert not any("secret" in " ".join(spec.argv) for spec in stack.services())


def test_the_prefect_server_gets_an_auth_string_csrf_and_its_own_origin_only(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    stack = LocalStack(load_settings(tmp_path), free_ports())
    stack.access_key, stack.secret_key, stack.prefect_auth = "k", "s", "headbench:t0ken"
    [server] = [s for s in stack.services() if s.name == "prefect"]
    assert server.env["PREFECT_SERVER_API_AUTH_STRING"] == "headbench:t0ken"
    assert server.env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert server.env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == stack.prefect_url
    assert "headbench:t0ken" not in " ".join(server.argv)  # argv is world-readable
    assert stack.standard_env()["PREFECT_API_AUTH_STRING"] == "headbench:t0ken"  # the env file, clients
    assert stack.worker_env()["PREFECT_API_AUTH_STRING"] == "headbench:t0ken"  # the worker, its flow runs
    settings = load_settings(tmp_path).model_copy(update={"prefect_api_auth_string": None})
    assert "PREFECT_API_AUTH_STRING" not in settings.standard_env()


def test_the_worker_polls_every_5_s_unless_prefect_worker_query_seconds_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    def polls() -> str:
        stack = LocalStack(load_settings(tmp_path), free_ports())
        stack.access_key, stack.secret_key = "k", "s"
        return stack.worker_env()["PREFECT_WORKER_QUERY_SECONDS"]

    assert polls() == "5"
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1.5")
    assert polls() == "1.5"


def test_services_start_side_by_side_after_what_they_need_and_are_reported_in_order(tmp_path: Path) -> None:
    """Real processes: `a` and `b` need nothing and boot together (b is healthy first), `c` starts only once
    `a` is healthy; `up` reports them a, b, c whatever order they became healthy in, and a second pass starts
    nothing; a service that exits during start-up fails in one line naming its log."""
    import sys
    import time

    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports
    from infra.stack.services import ServiceSpec, StackError

    stack = LocalStack(load_settings(tmp_path), free_ports())
    first_poll: dict[str, float] = {}
    healthy_at: dict[str, float] = {}

    def spec(name: str, boot_s: float, after: tuple[str, ...] = ()) -> ServiceSpec:
        flag = tmp_path / f"{name}.up"  # the process writes it once it has "booted"; health reads it
        code = f"import pathlib, time; time.sleep({boot_s}); pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"

        def healthy() -> bool:
            now = time.monotonic()
            first_poll.setdefault(name, now)
            if flag.exists():
                healthy_at.setdefault(name, now)
            return flag.exists()
        return ServiceSpec(name, [sys.executable, "-c", code], {}, healthy, f"test://{name}", "-c", after=after)

    specs = [spec("a", 3.0), spec("b", 0.1), spec("c", 0.1, after=("a",))]
    reported: list[str] = []
    try:
        stack._start_all(specs, timeout=60, on_ready=lambda name, url, already: reported.append(f"{name}:{already}"))
        assert reported == ["a:False", "b:False", "c:False"]
        assert healthy_at["b"] < healthy_at["a"]  # b booted while a was still booting
        assert first_poll["c"] >= healthy_at["a"]  # c was started only once a was healthy
        reported.clear()
        stack._start_all(specs, timeout=60, on_ready=lambda name, url, already: reported.append(f"{name}:{already}"))
        assert reported == ["a:True", "b:True", "c:True"]  # idempotent: nothing started twice
    finally:
        stack._stop(specs)
    crash = ServiceSpec("crash", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], {}, lambda: False,
                        "test://crash", "-c")
    with pytest.raises(StackError, match=r"crash exited during start-up; see .*crash\.log: boom"):
        stack._start_all([crash], timeout=60, on_ready=None)
    orphan = ServiceSpec("orphan", [sys.executable, "-c", "pass"], {}, lambda: False, "test://orphan", "-c",
                         after=("nowhere",))
    with pytest.raises(StackError, match="cannot start orphan: they wait for services that are not in the stack"):
        stack._start_all([orphan], timeout=60, on_ready=None)


def test_a_failed_up_stops_what_it_started_and_keeps_what_ran_before(tmp_path: Path) -> None:
    """Real processes: `kept` runs before `up`; `up` starts `fresh`, then `crash` exits during start-up. The
    one-line error comes, `fresh` is stopped again, `kept` still runs."""
    import sys

    from infra.processes.supervise import pid_alive
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports
    from infra.stack.services import ServiceSpec, StackError

    stack = LocalStack(load_settings(tmp_path), free_ports())

    def service(name: str, code: str, after: tuple[str, ...] = ()) -> ServiceSpec:
        return ServiceSpec(name, [sys.executable, "-c", code, name], {}, lambda: (tmp_path / f"{name}.up").exists(),
                           f"test://{name}", name, after=after)

    booting = (f"import os, pathlib, sys, time; pathlib.Path({str(tmp_path)!r}, sys.argv[1] + '.up')"
               ".write_text(str(os.getpid())); time.sleep(60)")
    kept, fresh = service("kept", booting), service("fresh", booting)
    crash = service("crash", "print('boom'); raise SystemExit(3)", after=("fresh",))
    try:
        stack._start_all([kept], timeout=30, on_ready=None)
        kept_pid = stack._pid("kept")
        with pytest.raises(StackError, match=r"crash exited during start-up; see .*crash\.log: boom"):
            stack._start_all([kept, fresh, crash], timeout=30, on_ready=None)
        fresh_pid = int((tmp_path / "fresh.up").read_text())  # it booted, and was stopped again
        assert not pid_alive(fresh_pid, "fresh")
        assert kept_pid is not None and stack._pid("kept") == kept_pid and pid_alive(kept_pid, "kept")
    finally:
        stack._stop([kept, fresh])
