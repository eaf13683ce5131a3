"""The production manifests parse and agree with the code: variable names, ports, pool, image entrypoints."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from infra.settings import Settings, StackPorts

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "infra/docker/compose.yaml").read_text())
K8S_CONFIG = list(yaml.safe_load_all((ROOT / "infra/k8s/headbench-config.yaml").read_text()))
RAY_CLUSTER = yaml.safe_load((ROOT / "infra/k8s/raycluster.yaml").read_text())
WORK_POOL = json.loads((ROOT / "infra/k8s/prefect-work-pool.json").read_text())


def _settings_variables() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.update(choices if choices else [alias] if isinstance(alias, str) else [])
    return names


SETTINGS_VARS = _settings_variables()  # every variable headbench reads, plus (below) the servers' own
SERVER_VARS = {"MLFLOW_BACKEND_STORE_URI", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
               "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY",
               "NCCL_DEBUG", "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED",
               "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY"}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_compose_variables_ports_and_commands_agree_with_the_code() -> None:
    services = COMPOSE["services"]
    for name, service in services.items():
        unknown = set(_env(service)) - SETTINGS_VARS - SERVER_VARS
        assert not unknown, f"{name}: variables the code does not read: {unknown}"
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name} publishes {mapping} beyond loopback"
    defaults = StackPorts()
    published = {name: int(service["ports"][0].split(":")[1]) for name, service in services.items()
                 if service.get("ports")}
    assert published["s3"] == defaults.s3 and published["mlflow"] == defaults.mlflow
    assert published["prefect-server"] == defaults.prefect
    worker = services["prefect-worker"]["command"]
    pool = Settings.model_fields["work_pool"].default
    # the worker container is a 0-CPU Ray node: its flow runs' drivers find a local raylet (a Ray 2.60 driver
    # given host:port needs one); the script joins, then runs the worker
    assert worker[0] == "infra/docker/as-ray-node.sh" and (ROOT / worker[0]).stat().st_mode & 0o111
    script = (ROOT / worker[0]).read_text()
    assert 'ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0' in script and 'exec "$@"' in script
    worker = worker[1:]
    assert worker[:3] == ["prefect", "worker", "start"] and worker[worker.index("--pool") + 1] == pool
    assert worker[worker.index("--type") + 1] == "process"
    env = _env(services["prefect-worker"])
    assert env["HEADBENCH_WORK_POOL"] == pool and env["RAY_ADDRESS"].endswith(":6379")
    assert env["MLFLOW_TRACKING_URI"].endswith(":5000") and env["PREFECT_API_URL"].endswith(":4200/api")
    assert "--port=6379" in services["ray-head"]["command"]
    # every Ray node and client has the token; MLflow requires its login, and every client has it
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
    mlflow = services["mlflow"]
    assert mlflow["command"][-2:] == ["--app-name", "basic-auth"]
    assert _env(mlflow)["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"]
    for node in ("ray-head", "ray-worker", "prefect-worker"):
        assert _env(services[node])["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]
    # the Prefect server is locked down as `headbench up` locks down its own
    server = _env(services["prefect-server"])
    assert server["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    init = (ROOT / "infra/docker/postgres-init.sql").read_text()
    assert "headbench_mlflow" in _env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"] and "headbench_mlflow" in init
    prefect_db = _env(services["prefect-server"])["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "headbench_prefect" in init


def test_image_commands_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "headbench" in project["scripts"]
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    for package in ("flows", "tasks", "models", "infra", "bench"):
        assert f"COPY {package} {package}" in dockerfile
    assert "COPY prefect.yaml" in dockerfile
    # the console scripts the services run come with the dependencies pinned in pyproject
    deps = " ".join(project["dependencies"])
    for tool in ("mlflow", "prefect", "ray["):
        assert tool in deps


def test_kubernetes_manifests_agree_with_the_code() -> None:
    config, secret = K8S_CONFIG
    assert config["kind"] == "ConfigMap" and secret["kind"] == "Secret"
    assert set(config["data"]) <= SETTINGS_VARS
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "PREFECT_API_URL", "RAY_ADDRESS"} <= set(config["data"])
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                                         "RAY_AUTH_TOKEN"}
    # token auth on every Ray container and flow-run pod (all read both), MLflow's login for every client
    assert config["data"]["RAY_AUTH_MODE"] == "token" and config["data"]["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert RAY_CLUSTER["apiVersion"] == "ray.io/v1" and RAY_CLUSTER["kind"] == "RayCluster"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert RAY_CLUSTER["spec"]["rayVersion"] == ray_pin.split("==")[1]
    [gpu] = RAY_CLUSTER["spec"]["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {config["metadata"]["name"], secret["metadata"]["name"]}
    assert config["data"]["RAY_ADDRESS"].startswith(f"{RAY_CLUSTER['metadata']['name']}-head-svc")
    job = WORK_POOL["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {next(iter(ref.values()))["name"] for ref in job["envFrom"]} == refs
    # a flow-run pod joins the cluster as a 0-CPU node, then runs the flow command Prefect gives it
    assert job["command"] == ["/opt/headbench/infra/docker/as-ray-node.sh"] and job["args"] == "{{ command }}"
    assert set(WORK_POOL["variables"]["properties"]) >= {"image", "env", "namespace", "command"}
