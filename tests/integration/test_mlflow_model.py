"""The published model as an MLflow model: the registry version's source is a pyfunc logged model that
`mlflow.pyfunc.load_model` and `mlflow models serve` load; the S3 copy loads into torchvision strictly;
the run page lists its datasets with digests; skip_if_unchanged trains nothing until the data changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
import torchvision
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from infra.data.load import load_raw
from infra.data.spec import DataSpec, prepare
from infra.processes.supervise import free_port, stop_group
from infra.publishing.load import load_published
from infra.publishing.store import fetch_model
from infra.storage.s3 import s3_client
from models.data import normalize_batch
from tests.dataset_files import png
from tests.integration.conftest import IMAGEFOLDER, Stack, headbench_run

CHAMPION = "models:/e2e-test@champion"


def _client(stack: Stack) -> MlflowClient:
    assert stack.settings.mlflow_tracking_uri
    return MlflowClient(stack.settings.mlflow_tracking_uri)


def _test_images(stack: Stack, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's own test split, as users hold images: (N, H, W) uint8 for this grayscale model."""
    spec = DataSpec(**manifest["data"])
    data = prepare(load_raw(spec, stack.settings.cache_dir), spec)
    return data.test.images[:, 0], data.test.labels


def test_the_registry_version_is_the_runs_logged_model_and_points_at_s3(stack: Stack, e2e_run: dict[str, str]) -> None:
    client = _client(stack)
    run = client.get_run(e2e_run["run_id"])
    model_id = run.data.tags["model_uri"].removeprefix("models:/")
    assert [m.model_id for m in run.outputs.model_outputs] == [model_id]  # "Logged models" on the run page
    version = client.get_model_version_by_alias("e2e-test", "champion")
    assert version.run_id == e2e_run["run_id"] and version.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert logged.status == LoggedModelStatus.READY
    assert logged.tags["headbench.s3_uri"] == e2e_run["s3_uri"]
    _, manifest = load_published(e2e_run["s3_uri"], stack.settings)
    assert logged.tags["headbench.sha256"] == manifest["sha256"]
    assert manifest["mlflow_model_uri"] == f"models:/{model_id}"  # each copy names the other
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.metadata["headbench.s3_uri"] == e2e_run["s3_uri"]
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, -1, -1]  # (N, H, W) uint8


def test_pyfunc_from_the_registry_predicts_names_and_probabilities(stack: Stack, e2e_run: dict[str, str]) -> None:
    pyfunc = mlflow.pyfunc.load_model(CHAMPION)
    net, manifest = load_published(CHAMPION, stack.settings)
    images, labels = _test_images(stack, manifest)
    out = pyfunc.predict(images)
    assert list(out.columns) == ["label", "probability", "probabilities"] and len(out) == len(labels)
    with torch.no_grad():
        expected = torch.softmax(net(normalize_batch(torch.from_numpy(images[:, None]))), dim=1)
    names = manifest["class_names"]
    assert out["label"].tolist() == [names[i] for i in expected.argmax(1).tolist()]
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), expected.numpy(), atol=1e-5)
    # the same accuracy the run logged, from the registry alone
    accuracy = float(np.mean(np.array(out["label"].tolist()) == np.array([names[i] for i in labels])))
    assert accuracy == pytest.approx(_client(stack).get_run(e2e_run["run_id"]).data.metrics["test_accuracy"], abs=1e-6)
    # images at another size are resized by the model, as its manifest says
    assert len(pyfunc.predict(np.zeros((2, 50, 40), dtype=np.uint8))) == 2


def test_mlflow_models_serve_answers_invocations(stack: Stack, e2e_run: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": str(stack.settings.mlflow_tracking_uri),
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", CHAMPION,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 90 s"
            time.sleep(0.5)
        _, manifest = load_published(e2e_run["s3_uri"], stack.settings)
        images, _ = _test_images(stack, manifest)
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images[:3].tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 3
        assert all(p["label"] in manifest["class_names"] and sum(p["probabilities"]) == pytest.approx(1, abs=1e-4)
                   for p in predictions)
        bad = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": [[1.5]]}, timeout=60)
        assert bad.status_code == 400  # the signature refuses what is not (N, H, W) uint8
    finally:
        stop_group(server.pid)
        log.close()


def test_published_replace_fc_weights_load_into_torchvision_strictly(stack: Stack, e2e_run: dict[str, str],
                                                                    tmp_path: Path) -> None:
    weights, manifest = fetch_model(s3_client(stack.settings), e2e_run["s3_uri"], tmp_path,
                                    stack.settings.s3_endpoint_url)
    assert manifest["key_format"] == "torchvision"
    tv = torchvision.models.resnet18(num_classes=manifest["num_classes"]).eval()
    tv.load_state_dict(load_file(weights), strict=True)
    net, _ = load_published(e2e_run["s3_uri"], stack.settings)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), net(x))


def test_the_run_lists_its_three_datasets_with_digests(stack: Stack, e2e_run: dict[str, str]) -> None:
    run = _client(stack).get_run(e2e_run["run_id"])
    _, manifest = load_published(e2e_run["s3_uri"], stack.settings)
    lineage = manifest["lineage"]
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    sizes = {"train": int(run.data.params["train_size"]), "val": int(run.data.params["val_size"]),
             "test": int(run.data.params["test_size"])}
    assert lineage["split_sizes"] == sizes and sum(sizes.values()) == 150 + 60
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = inputs[context]
        profile = json.loads(dataset.profile)
        assert dataset.name == f"fashion-mnist-{split}" and dataset.digest == lineage["split_sha256"][split][:32]
        assert profile["sha256"] == lineage["split_sha256"][split] == run.data.params[f"{split}_data_sha256"]
        assert profile["rows"] == sizes[split] and profile["classes"] == ["T-shirt/top", "Trouser", "Pullover"]
        assert profile["files_sha256"] == lineage["files_sha256"] == run.data.params["data_sha256"]
        assert "fashion-mnist" in json.loads(dataset.source)["url"]


def test_skip_if_unchanged_trains_only_when_the_s3_imagefolder_changed(
        stack: Stack, imagefolder_run: tuple[list[str], dict[str, str]]) -> None:
    """An ImageFolder prefix in S3: the first run trains; the second finds the champion's data digest and
    params unchanged and trains nothing; one image edited in place at the same size and one removed, and the
    third trains again on exactly what the prefix now holds."""
    s3 = s3_client(stack.settings)
    bucket, prefix = stack.settings.data_bucket, IMAGEFOLDER
    args, first = imagefolder_run
    assert "promotion  : champion" in first["stdout"]
    client = _client(stack)
    experiment = client.get_experiment_by_name(stack.settings.experiment).experiment_id
    runs_before = len(client.search_runs([experiment], max_results=1000))
    done = subprocess.run([str(Path(sys.executable).parent / "headbench"), "run", *args], capture_output=True,
                          text=True, timeout=300, check=False, env=stack.cli_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped: nothing changed" in done.stdout and "champion is v1" in done.stdout
    assert len(client.search_runs([experiment], max_results=1000)) == runs_before  # no MLflow run: no training
    assert len(client.search_model_versions("name='skiptest'")) == 1  # nothing trained, nothing published
    old = s3.get_object(Bucket=bucket, Key=f"{prefix}/rose/0.png")["Body"].read()
    new = next(image for v in range(256) if len(image := png(v)) == len(old) and image != old)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/rose/0.png", Body=new)  # same size, other pixels
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/daisy/13.png")
    third = headbench_run(stack, *args)
    assert "training data changed since champion v1" in third["stdout"]
    assert len(client.search_model_versions("name='skiptest'")) == 2
    before, after = client.get_run(first["run_id"]).data.params, client.get_run(third["run_id"]).data.params
    assert after["data_sha256"] != before["data_sha256"]
    sizes = [sum(int(p[f"{split}_size"]) for split in ("train", "val", "test")) for p in (before, after)]
    assert sizes == [28, 27]  # the removed image is gone from the local mirror too
