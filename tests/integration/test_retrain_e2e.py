"""End to end: `headbench run` on a tiny subset against the real stack and a real Ray cluster, then every
promise checked from the outside with boto3, MlflowClient, the Prefect API and Ray's state API."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.data.load import load_raw
from infra.data.spec import DataSpec, prepare
from infra.publishing.load import load_published
from infra.stack.prefect_api import prefect_http
from infra.stack.ray_nodes import RayCluster
from infra.storage.s3 import s3_client, split_uri
from infra.training.worker import TRAIN_STATE
from models.weights import WEIGHTS_FILE
from tasks.evaluate import evaluate_split
from tests.integration.conftest import E2E_EPOCHS as EPOCHS
from tests.integration.conftest import Stack, train_worker_nodes

RAY_LINES = ("(RayTrainWorker", "(TrainController", "TrainingReport(", "core_worker.cc", "PreemptionWatcher",
             "NumPy array is not writable", "Checkpoint successfully created")


def test_progress_is_visible_once_per_epoch_and_no_ray_line_reaches_the_console(e2e_run: dict[str, str]) -> None:
    out = e2e_run["stdout"]
    for epoch in range(1, EPOCHS + 1):
        lines = re.findall(rf"^epoch {epoch}/{EPOCHS} \[finetune\] train_loss=\S+ .* \d+ img/s$", out, re.MULTILINE)
        assert len(lines) == 1, out[-3000:]
    for stage in ("download", "build", "train", "evaluate", "publish", "promote", "done"):
        assert re.search(rf"^\[ *\d+\.\d s\] {stage}$", out, re.MULTILINE), stage
    leaked = [marker for marker in RAY_LINES if marker in out]
    assert not leaked, f"Ray output on the console: {leaked}\n{out[-3000:]}"
    assert re.search(r"ECE 0\.\d{4}", out) and re.search(r"\d+\.\d ms p50", out)


def test_s3_objects_match_the_manifest(stack: Stack, e2e_run: dict[str, str]) -> None:
    bucket, prefix = split_uri(e2e_run["s3_uri"])
    assert prefix == f"e2e-test/{e2e_run['run_id']}/"
    client = s3_client(stack.settings)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert keys == {prefix + "model.safetensors", prefix + "manifest.json"}
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    weights = client.get_object(Bucket=bucket, Key=prefix + "model.safetensors")["Body"].read()
    assert hashlib.sha256(weights).hexdigest() == manifest["sha256"]
    assert manifest["arch"] == "resnet18" and manifest["strategy"] == "replace-fc" and manifest["num_classes"] == 3
    assert manifest["class_names"] == ["T-shirt/top", "Trouser", "Pullover"]
    assert manifest["mlflow_run_id"] == e2e_run["run_id"] and manifest["image_size"] == 32


def test_mlflow_run_has_params_metrics_artifacts_and_version(stack: Stack, e2e_run: dict[str, str],
                                                             tmp_path: Path) -> None:
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    client = MlflowClient(uri)
    run = client.get_run(e2e_run["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["arch"], params["strategy"], params["epochs"], params["classes"]) == ("resnet18", "replace-fc", "2",
                                                                                          "0-2")
    assert params["num_classes"] == "3" and params["in_features"] == "512" and params["workers"] == "2"
    assert run.data.tags["model_s3_uri"] == e2e_run["s3_uri"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    correct = run.data.metrics["test_accuracy"] * int(params["test_size"])  # a share of the test images
    assert correct == pytest.approx(round(correct), abs=1e-3)  # logged as a float32 and int(params["test_size"]) == 60
    evaluation = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/confusion_matrix.png" in evaluation
    png = client.download_artifacts(run.info.run_id, "evaluation/confusion_matrix.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    versions = client.search_model_versions("name='e2e-test'")
    mine = [v for v in versions if v.run_id == run.info.run_id]
    assert len(mine) == 1 and mine[0].source == run.data.tags["model_uri"]  # the logged MLflow model
    card = client.get_model_version("e2e-test", mine[0].version).description  # the version's model card
    assert f"resnet18 `replace-fc` on fashion-mnist (classes 0-2), data sha256 {params['data_sha256'][:16]}" in card
    assert f"test: accuracy {run.data.metrics['test_accuracy']:.4f}" in card and "promotion: champion: " in card
    assert run.info.run_id in card and run.data.tags["prefect.flow_run_url"] in card


def test_published_model_reproduces_logged_test_accuracy(stack: Stack, e2e_run: dict[str, str]) -> None:
    model, manifest = load_published(e2e_run["s3_uri"], stack.settings)
    spec = DataSpec(**manifest["data"])
    data = prepare(load_raw(spec, stack.settings.cache_dir), spec)
    assert data.class_names == manifest["class_names"]
    metrics = evaluate_split(model, data.test, manifest["num_classes"])
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    logged = MlflowClient(uri).get_run(e2e_run["run_id"]).data.metrics["test_accuracy"]
    assert metrics.accuracy == pytest.approx(logged, abs=1e-6)
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(logged, abs=1e-6)


def test_prefect_server_recorded_the_flow_run(stack: Stack, e2e_run: dict[str, str]) -> None:
    uri = stack.settings.mlflow_tracking_uri
    assert uri and stack.settings.prefect_api_url
    flow_run_id = MlflowClient(uri).get_run(e2e_run["run_id"]).data.tags["prefect.flow_run_id"]
    with prefect_http(stack.settings) as api:
        response = api.get(f"/flow_runs/{flow_run_id}")
        tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    assert response.status_code == 200
    body = response.json()
    assert body["state_type"] == "COMPLETED"
    assert re.fullmatch(r"e2e-test-\d{4}-\d\d-\d\dT\d{4}", body["name"]), body["name"]  # the model, when due
    assert MlflowClient(uri).get_run(e2e_run["run_id"]).info.run_name == body["name"]
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    assert {"download-data", "build-model", "train", "evaluate", "publish"} <= names
    assert all(t["state_type"] == "COMPLETED" for t in tasks)


def test_training_ran_on_both_nodes_of_the_ray_cluster(stack: Stack, ray_cluster: RayCluster,
                                                        e2e_run: dict[str, str]) -> None:
    """SPREAD over the two-node cluster: one worker per raylet (the data went by the object store, the
    checkpoints to S3); the run is tagged with its Ray job and the cluster's size."""
    assert stack.settings.mlflow_tracking_uri
    nodes = train_worker_nodes(ray_cluster, stack.settings.mlflow_tracking_uri, e2e_run["run_id"])
    assert nodes == set(ray_cluster.node_ids().values())
    tags = MlflowClient(stack.settings.mlflow_tracking_uri).get_run(e2e_run["run_id"]).data.tags
    assert tags["ray.nodes"] == "2"
    checkpoints = s3_client(stack.settings).list_objects_v2(Bucket=stack.settings.checkpoint_bucket,
                                                            Prefix=f"ray/{e2e_run['run_id']}/")
    assert any(o["Key"].endswith("model.safetensors") for o in checkpoints.get("Contents", []))


def test_a_published_runs_checkpoints_are_pruned_to_the_newest(stack: Stack, e2e_run: dict[str, str]) -> None:
    """E2E_EPOCHS (2) checkpoints were written (Ray keeps 2 while training); once the model is published, the
    newest one alone stays (HEADBENCH_KEEP_CHECKPOINTS=1), whole, beside Ray's own run state: the one of the
    last epoch, with every epoch's history."""
    listed = s3_client(stack.settings).list_objects_v2(Bucket=stack.settings.checkpoint_bucket,
                                                       Prefix=f"ray/{e2e_run['run_id']}/")
    keys = [o["Key"].split("/", 2)[2] for o in listed.get("Contents", [])]
    folders = {k.split("/", 1)[0] for k in keys if k.startswith("checkpoint_") and "/" in k}
    assert len(folders) == 1, sorted(keys)
    [kept] = folders
    assert {f"{kept}/{WEIGHTS_FILE}", f"{kept}/{TRAIN_STATE}"} <= set(keys)
    body = s3_client(stack.settings).get_object(Bucket=stack.settings.checkpoint_bucket,
                                                Key=f"ray/{e2e_run['run_id']}/{kept}/{TRAIN_STATE}")["Body"].read()
    state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS and len(state["history"]) == EPOCHS, (state["epoch"], state["history"])
    assert any(not k.startswith("checkpoint_") for k in keys)  # Ray's run state (the snapshot) is kept
