"""Deployments end to end: `headbench deploy` against the real Prefect server, runs triggered the way the
dashboard's Custom Run does (POST /api/deployments/{id}/create_flow_run), executed by the stack's real
process worker, then checked in MLflow, the registry, S3 and Prefect's artifacts; the alerts `deploy --notify`
sets up, received by a webhook on loopback."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from flows.deploy import PROJECT_ROOT
from infra.data.catalogue import load_fashion_mnist
from infra.data.load import load_raw
from infra.data.spec import DataSpec, prepare
from infra.processes.supervise import free_port
from infra.publishing.load import load_published
from infra.stack.prefect_api import prefect_http
from infra.stack.ray_nodes import RayCluster
from infra.storage.s3 import s3_client, split_uri
from models.strategies import all_strategies
from tasks.evaluate import evaluate_split
from tests.integration.conftest import Stack, train_actor_nodes

HEADBENCH = str(Path(sys.executable).parent / "headbench")
PREFECT = str(Path(sys.executable).parent / "prefect")
MODEL = "deploy-test"
CRON = "0 0 29 2 *"  # stored and active, but its runs (leap days only) never start during a test session
# Trouser, Bag, Ankle boot: separable enough that two short epochs give a clearly better-than-chance model.
GOOD = {"classes": "1,8,9", "limit": 300, "test_limit": 150, "image_size": 32, "epochs": 2, "batch_size": 32,
        "lr": 0.05, "workers": 1, "precise_bn_batches": 5, "model_name": MODEL, "warm_start": "none"}
# The same split and budget, but a learning rate that cannot move a random init: near chance (1/3).
WEAK = GOOD | {"lr": 1e-6, "epochs": 1}


class _RetryBusy(httpx.HTTPTransport):
    """Retry 429/503 with backoff, as Prefect's own client (and so the dashboard's calls through it) does: the
    server answers 503 for errors it deems retryable, e.g. SQLite busy while flow runs write their states."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(5):
            response = super().handle_request(request)
            if response.status_code not in (429, 503):
                return response
            response.close()
            time.sleep(2**attempt)
        return super().handle_request(request)


def api(stack: Stack) -> httpx.Client:
    """The REST API as the dashboard calls it: the stack's auth string and a CSRF token."""
    return prefect_http(stack.settings, transport=_RetryBusy())


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback: (its URL, the JSON bodies it received)."""
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


@pytest.fixture(scope="module")
def deployed(stack: Stack, webhook: tuple[str, list[dict[str, Any]]]) -> Iterator[dict[str, dict[str, Any]]]:
    args = [HEADBENCH, "deploy", "--cron", CRON, "--timezone", "Europe/Berlin",
            "--param", "classes=1,8,9", "--param", f"model_name={MODEL}", "--notify", webhook[0]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=stack.cli_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "retrain/scheduled" in done.stdout and "compare-heads/on-demand" in done.stdout
    assert "alerts     : 3 Prefect automations" in done.stdout, done.stdout
    with api(stack) as client:
        yield {name: client.get(f"/deployments/name/{name}").raise_for_status().json()
               for name in ("retrain/scheduled", "compare-heads/on-demand")}
    with api(stack) as client:  # the receiver goes with this module: so do the automations that call it
        for automation in client.post("/automations/filter", json={}).raise_for_status().json():
            if automation["name"].startswith("headbench: "):
                client.delete(f"/automations/{automation['id']}")


def trigger(stack: Stack, deployment: dict[str, Any], params: dict[str, Any],
            job_variables: dict[str, Any] | None = None, tags: list[str] | None = None) -> httpx.Response:
    with api(stack) as client:
        return client.post(f"/deployments/{deployment['id']}/create_flow_run", json={
            "parameters": {"params": params}, "job_variables": job_variables or {}, "tags": tags or []})


def wait_final(stack: Stack, flow_run_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with api(stack) as client:
        while time.monotonic() < deadline:
            run = client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s; see {stack.home}/logs/worker.log")


def mlflow_run_of(stack: Stack, flow_run_id: str) -> Any:
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(stack.settings.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"expected one MLflow run for flow run {flow_run_id}, got {len(runs)}"
    return runs[0]


def test_deploy_stores_schedule_pool_and_typed_schema(stack: Stack, deployed: dict[str, dict[str, Any]]) -> None:
    retrain, compare = deployed["retrain/scheduled"], deployed["compare-heads/on-demand"]
    [schedule] = retrain["schedules"]
    assert schedule["schedule"]["cron"] == CRON and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] and compare["schedules"] == []
    for d in (retrain, compare):
        assert d["work_pool_name"] == stack.settings.work_pool and d["enforce_parameter_schema"]
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": str(PROJECT_ROOT)}}]
    assert retrain["parameters"]["params"]["warm_start"] == "champion"  # scheduled runs start from the champion
    assert retrain["parameters"]["params"]["skip_if_unchanged"] is True  # and train only when something changed
    assert retrain["parameters"]["params"]["classes"] == "1,8,9"

    fields = retrain["parameter_openapi_schema"]["definitions"]["RetrainParams"]["properties"]
    assert fields["arch"]["enum"] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert fields["strategy"]["enum"] == all_strategies()
    assert fields["promote"]["enum"] == ["never", "if-better", "always"]
    assert fields["epochs"]["minimum"] == 1 and fields["lr"]["exclusiveMinimum"] == 0
    assert all(f.get("description") for f in fields.values()), "every form field has help text"
    compare_fields = compare["parameter_openapi_schema"]["definitions"]["CompareParams"]["properties"]
    assert compare_fields["strategies"]["items"]["enum"] == all_strategies()

    # what `prefect deployment schedule ls` shows comes from the server
    env = stack.cli_env(PREFECT_API_URL=f"{stack.stack.prefect_url}/api",
                        PREFECT_API_AUTH_STRING=stack.stack.prefect_auth or "")  # as `source .headbench/env`
    listed = subprocess.run([PREFECT, "deployment", "schedule", "ls", "retrain/scheduled"], capture_output=True,
                            text=True, timeout=120, check=False, env=env)
    assert listed.returncode == 0 and CRON in listed.stdout, listed.stdout + listed.stderr


@pytest.mark.parametrize(("field", "value"), [
    ("arch", "resnet9"), ("strategy", "nope"), ("strategy", "conv1x1+warp"), ("epochs", 0), ("lr", -0.1),
    ("image_size", 8), ("batch_size", 1), ("promote", "sometimes"), ("min_margin", -0.5),
    ("model_name", "../escape"), ("colour", "red"), ("classes", "[/]"), ("classes", "a,b"),
])
def test_invalid_parameter_is_rejected_with_409(stack: Stack, deployed: dict[str, dict[str, Any]], field: str,
                                                value: Any) -> None:
    deployment = deployed["retrain/scheduled"]
    tag = f"bad-{field}"
    response = trigger(stack, deployment, GOOD | {field: value}, tags=[tag])
    assert response.status_code == 409, response.text
    assert field in response.json()["detail"]
    with api(stack) as client:  # nothing was created
        assert client.post("/flow_runs/count", json={"flow_runs": {"tags": {"all_": [tag]}}}).json() == 0


def test_schema_valid_but_wrong_values_fail_at_the_flow_runs_start_before_any_run_or_object(
        stack: Stack, deployed: dict[str, dict[str, Any]]) -> None:
    """A class range 5-2, or a batch that leaves a worker one sample, passes the schema (the server creates
    the flow run) but fails in the flow's parameter validation, before an MLflow run exists (and so before
anything can be published: every S3 object of a run lives under its run id)."""
    deployment = deployed["retrain/scheduled"]
    cases = {"start > end": GOOD | {"classes": "5-2"},
             "leaves 1 sample(s) per worker": GOOD | {"batch_size": 2, "workers": 2, "limit": 300}}
    created = {why: trigger(stack, deployment, params).raise_for_status().json()["id"] for why, params in
               cases.items()}
    for why, flow_run_id in created.items():
        run = wait_final(stack, flow_run_id, timeout=180)
        assert run["state"]["type"] == "FAILED", run["state"]
        assert why in run["state"]["message"], run["state"]["message"]
        if run["start_time"]:  # unset when validation failed before the run entered RUNNING: sooner still
            took = (dt.datetime.fromisoformat(run["end_time"].replace("Z", "+00:00"))
                    - dt.datetime.fromisoformat(run["start_time"].replace("Z", "+00:00"))).total_seconds()
            assert took < 30, took  # generous (a second or two here): no Ray job, no training started
        mlflow = MlflowClient(stack.settings.mlflow_tracking_uri)
        exp = mlflow.get_experiment_by_name(stack.settings.experiment)
        assert exp is None or not mlflow.search_runs([exp.experiment_id],
                                                     f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


@pytest.mark.training
def test_dashboard_runs_promote_the_better_model_only(stack: Stack, ray_cluster: RayCluster,
                                                      deployed: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    deployment = deployed["retrain/scheduled"]
    on_cluster = {"env": {"RAY_ADDRESS": ray_cluster.address}}
    mlflow = MlflowClient(stack.settings.mlflow_tracking_uri)
    s3 = s3_client(stack.settings)

    # 1) the first model of a name becomes champion
    created = trigger(stack, deployment, GOOD, on_cluster)
    assert created.status_code == 201, created.text
    first = wait_final(stack, created.json()["id"])
    assert first["state"]["type"] == "COMPLETED", f"{first['state']}; see {stack.home}/logs/worker.log"
    run = mlflow_run_of(stack, first["id"])
    tags = run.data.tags
    assert tags["prefect.deployment"] == "retrain/scheduled" and tags["prefect.scheduled"] == "false"
    assert tags["prefect.flow_run_url"] == f"{stack.stack.prefect_url}/flow-runs/flow-run/{first['id']}"
    assert tags["promotion"] == "champion"
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    bucket, prefix = split_uri(tags["model_s3_uri"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert keys == {prefix + "model.safetensors", prefix + "manifest.json"}
    [v1] = mlflow.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert v1.name == MODEL and v1.source == tags["model_uri"]  # the logged model
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == v1.version
    pointer = json.loads(s3.get_object(Bucket=bucket, Key=f"{MODEL}/champion.json")["Body"].read())
    assert pointer["version"] == v1.version and pointer["s3_uri"] == tags["model_s3_uri"]
    assert pointer["prefect.flow_run_id"] == first["id"]
    # its score is the published model's accuracy on the run's test split, computed again here from S3
    champion_score = float(tags["challenger_score"])
    model, manifest = load_published(tags["model_s3_uri"], stack.settings)
    spec = DataSpec(**manifest["data"])
    rescored = evaluate_split(model, prepare(load_raw(spec, stack.settings.cache_dir), spec).test,
                              manifest["num_classes"]).accuracy
    assert champion_score == pytest.approx(rescored, abs=1e-6)
    assert champion_score == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    # the worker's flow run attached to the stack's 0-CPU driver node (what a worker container that ran
    # `ray start --num-cpus=0` is): Train's controller ran there, the training workers on the CPU nodes
    nodes = train_actor_nodes(ray_cluster, stack.settings.mlflow_tracking_uri, run.info.run_id)
    assert nodes["TrainController"] == {ray_cluster.driver_node_id()}
    assert nodes["RayTrainWorker"] and nodes["RayTrainWorker"] <= set(ray_cluster.node_ids().values())

    with api(stack) as client:
        artifacts = client.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [first["id"]]}}}).raise_for_status().json()
    by_key = {a["key"]: a for a in artifacts}
    assert run.info.run_id in by_key["retrain-mlflow-run"]["data"]
    assert "Promotion: champion" in by_key["retrain-summary"]["data"]

    # 2) a deliberately weaker run on the same split is registered but does not take the alias
    created = trigger(stack, deployment, WEAK, on_cluster)
    assert created.status_code == 201, created.text
    second = wait_final(stack, created.json()["id"])
    assert second["state"]["type"] == "COMPLETED", f"{second['state']}; see {stack.home}/logs/worker.log"
    weak = mlflow_run_of(stack, second["id"])
    [v2] = mlflow.search_model_versions(f"run_id = '{weak.info.run_id}'")
    assert int(v2.version) == int(v1.version) + 1
    assert v2.tags["promotion"] == "challenger-rejected"
    assert float(v2.tags["challenger_score"]) < float(v2.tags["champion_score"])
    assert abs(float(v2.tags["champion_score"]) - champion_score) < 1e-6  # the champion, rescored on the split
    assert v2.tags["champion_version"] == v1.version
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == v1.version
    pointer = json.loads(s3.get_object(Bucket=bucket, Key=f"{MODEL}/champion.json")["Body"].read())
    assert pointer["version"] == v1.version

    # 3) predict with the champion, preprocessing from its manifest
    raw = load_fashion_mnist(stack.settings.cache_dir)
    trousers = np.flatnonzero(raw.test_labels == 1)[:4]
    paths = []
    for i in trousers:
        path = tmp_path / f"trouser-{i}.png"
        Image.fromarray(raw.test_images[i]).save(path)
        paths.append(str(path))
    done = subprocess.run([HEADBENCH, "predict", "--model", f"models:/{MODEL}@champion", "-k", "2", *paths],
                          capture_output=True, text=True, timeout=300, check=False, env=stack.cli_env())
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 4 and all(len(line.split(",")) == 2 for line in lines)
    assert sum(line.split(": ", 1)[1].startswith("Trouser ") for line in lines) >= 3, done.stdout


@pytest.mark.training
def test_alerts_send_one_message_per_outcome(stack: Stack, deployed: dict[str, dict[str, Any]],
                                             webhook: tuple[str, list[dict[str, Any]]]) -> None:
    """The automations `deploy --notify` created, against the runs of the tests above: one message per failed
    flow run of the deployment, one for the new champion and one for the rejected challenger, each with the
    model, the versions and the scores; nothing for other models' runs."""
    mlflow = MlflowClient(stack.settings.mlflow_tracking_uri)
    versions = {v.tags.get("promotion"): v for v in mlflow.search_model_versions(f"name = '{MODEL}'")}
    champion, rejected = versions["champion"], versions["challenger-rejected"]
    with api(stack) as client:
        failed = client.post("/flow_runs/filter", json={"flow_runs": {
            "deployment_id": {"any_": [deployed["retrain/scheduled"]["id"]]},
            "state": {"type": {"any_": ["FAILED", "CRASHED"]}}}}).raise_for_status().json()
    assert failed, "the tests above leave failed flow runs of the deployment"
    expected = len(failed) + 2
    deadline = time.monotonic() + 120  # Prefect's triggers and actions services act within seconds
    while len(webhook[1]) < expected and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(3)  # and nothing more arrives
    messages = webhook[1]
    assert len(messages) == expected, messages
    for run in failed:
        [message] = [m for m in messages if run["id"] in m["body"]]
        assert message["subject"] == f"headbench: {run['name']} {run['state']['name']}"
        assert f"of deployment scheduled ended {run['state']['name']}" in message["body"]
    [promoted] = [m for m in messages if "is the champion" in m["subject"]]
    assert promoted["subject"] == f"headbench: {MODEL} v{champion.version} is the champion"
    assert f"test_accuracy {float(champion.tags['challenger_score']):.4f}".rstrip("0") in promoted["body"]
    [refused] = [m for m in messages if "rejected" in m["subject"]]
    assert refused["subject"] == f"headbench: {MODEL} v{rejected.version} rejected"
    assert f"against champion v{champion.version}" in refused["body"] and MODEL in refused["body"]


@pytest.mark.training
def test_down_with_a_flow_run_in_flight_cancels_it_and_publishes_nothing(
        stack: Stack, deployed: dict[str, dict[str, Any]], ray_cluster: RayCluster) -> None:
    """`headbench down`'s first step (SIGTERM to the worker) while the worker runs a deployed retrain in epoch
    2 ends the flow run within seconds: its Ray job aborted, the MLflow run KILLED, the Prefect flow run
    CANCELLED, nothing published, no flow-run process left. The servers stay up so that the end states can
    be read; `up` then starts the worker again for the tests after this one."""
    import psutil
    from ray.util.state import list_actors

    name = "down-in-flight"
    params = GOOD | {"epochs": 3, "limit": 600, "model_name": name, "skip_if_unchanged": False}
    response = trigger(stack, deployed["retrain/scheduled"], params, {"env": {"RAY_ADDRESS": ray_cluster.address}})
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    deadline, runs = time.monotonic() + 300, []
    while time.monotonic() < deadline and not (runs and any(
            m.step == 1 for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))):
        exp = client.get_experiment_by_name(stack.settings.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'") if exp else []
        time.sleep(0.5)
    assert runs, f"flow run {flow_run_id} never logged epoch 1; see {stack.home}/logs/worker.log"
    worker_pid = stack.stack._pid("worker")
    assert worker_pid is not None
    flow_procs = [p for p in psutil.Process(worker_pid).children(recursive=True)
                  if "prefect.engine" in " ".join(p.cmdline())]
    assert flow_procs, "the worker runs no flow-run process"
    started = time.monotonic()
    try:
        [worker] = [s for s in stack.stack.services() if s.name == "worker"]
        assert stack.stack._stop([worker]) == ["worker"]
        _, alive = psutil.wait_procs(flow_procs, timeout=max(0.1, 30 - (time.monotonic() - started)))
        took = time.monotonic() - started
        # generous (a few seconds here; the promise is 10 s on an idle machine)
        assert not alive and took < 30, f"the flow-run process outlived down's worker step ({took:.1f} s)"
        run = client.get_run(runs[0].info.run_id)
        assert run.info.status == "KILLED"
        with api(stack) as prefect:
            state = prefect.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()["state"]
        assert state["type"] == "CANCELLED", state
        assert client.search_model_versions(f"name = '{name}'") == []
        keys = s3_client(stack.settings).list_objects_v2(Bucket=stack.settings.model_bucket, Prefix=f"{name}/")
        assert keys.get("KeyCount", 0) == 0
        deadline = time.monotonic() + 10
        actors: list[Any] = [None]
        while actors and time.monotonic() < deadline:
            actors = list_actors(address=ray_cluster.dashboard_url, limit=100, raise_on_missing_output=False,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            time.sleep(0.5)
        assert actors == []
    finally:
        stack.stack.up(timeout=120)


def test_prefect_yaml_deploys_the_same_deployments(stack: Stack, deployed: dict[str, dict[str, Any]]) -> None:
    """`prefect deploy --all` with the repo's prefect.yaml (last in this module: it resets the schedule)."""
    env = stack.cli_env(PREFECT_API_URL=f"{stack.stack.prefect_url}/api", PWD=str(PROJECT_ROOT),
                        PREFECT_API_AUTH_STRING=stack.stack.prefect_auth or "")
    done = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with api(stack) as client:
        for name, before in deployed.items():
            after = client.get(f"/deployments/name/{name}").raise_for_status().json()
            assert after["id"] == before["id"]  # updated in place, not duplicated
            assert after["pull_steps"] == before["pull_steps"]
            assert after["work_pool_name"] == before["work_pool_name"]
            assert after["parameter_openapi_schema"] == before["parameter_openapi_schema"]
        retrain = client.get("/deployments/name/retrain/scheduled").json()
        try:
            assert [s["schedule"]["cron"] for s in retrain["schedules"]] == ["0 3 * * *"]
        finally:  # the real daily schedule must not start a run on the session's worker if the suite runs at 03:00
            client.post(f"/deployments/{retrain['id']}/pause_deployment").raise_for_status()
        assert client.get(f"/deployments/{retrain['id']}").json()["paused"]
        scheduled = client.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [retrain["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        assert scheduled == []  # pausing removed the runs the scheduler had already planned

