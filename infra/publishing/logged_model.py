"""A published model as an MLflow model: a pyfunc logged model (``infra/publishing/pyfunc.py``) carrying the
S3 publication's safetensors and manifest, the registry version's source.

The two copies point at each other: the manifest in S3 holds ``mlflow_model_uri`` (``models:/<model id>``),
and the logged model's MLmodel metadata and tags hold the S3 URI and the weights' sha256. The logged model
is created first (PENDING) so its id can go into the manifest; its artifacts are uploaded after the S3
publication succeeded, and only then is it marked READY.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

import models
from infra.tracking.runs import S3_URI_KEY, SHA256_KEY, Tracker

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
LOGGED_MODEL_NAME = "model"  # the artifact name in the run page's "Logged models"
MODEL_ID_TAG = "mlflow_model_id"  # run tag: a retried publish task reuses the logged model it created


@dataclass(frozen=True)
class LoggedClassifier:
    model_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


def requirements() -> list[str]:
    """What serving the pyfunc needs, pinned to what trained it (no inference by loading the model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("mlflow", "torch", "torchvision", "safetensors", "numpy", "pandas", "pillow")]


def signature(channels: int) -> ModelSignature:
    """uint8 images of any size, in the form the model was trained on: (N, H, W) gray, (N, H, W, 3) RGB."""
    shape = (-1, -1, -1) if channels == 1 else (-1, -1, -1, 3)
    outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                      ColSpec(Array(DataType.double), "probabilities")])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]), outputs=outputs)


def input_example(images: np.ndarray) -> np.ndarray:
    """Two training-form images from (N, C, S, S) uint8: (2, S, S) gray or (2, S, S, 3) RGB."""
    sample = np.ascontiguousarray(images[:2])
    return sample[:, 0] if sample.shape[1] == 1 else sample.transpose(0, 2, 3, 1).copy()


def start_logged_model(tracker: Tracker, experiment_id: str, tags: dict[str, str]) -> LoggedClassifier:
    """The run's logged model (PENDING until ``finish_logged_model``); a retry reuses the one it made."""
    run = tracker.client.get_run(tracker.run_id)
    existing = run.data.tags.get(MODEL_ID_TAG)
    if existing:
        return LoggedClassifier(existing)
    model = tracker.client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=tracker.run_id,
                                               tags=tags, model_type="headbench-classifier")
    tracker.set_tags({MODEL_ID_TAG: model.model_id})
    return LoggedClassifier(model.model_id)


def finish_logged_model(tracker: Tracker, logged: LoggedClassifier, weights: Path, manifest: dict[str, Any],
                        s3_uri: str, example: np.ndarray) -> None:
    """Save the pyfunc (weights + manifest as artifacts, ``models`` as code), upload it into the logged
    model, link it to the run as an output, and mark it READY."""
    import json

    client = tracker.client
    metadata = {S3_URI_KEY: s3_uri, SHA256_KEY: manifest["sha256"], "arch": manifest["arch"],
                "strategy": manifest["strategy"], "class_names": manifest["class_names"],
                "image_size": manifest["image_size"], "channels": manifest["channels"]}
    entity = client.get_logged_model(logged.model_id)
    with tempfile.TemporaryDirectory() as tmp:
        manifest_file = Path(tmp) / "manifest.json"
        manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(local), python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights), "manifest": str(manifest_file)},
            code_paths=[str(Path(models.__file__).parent)], signature=signature(int(manifest["channels"])),
            input_example=example, pip_requirements=requirements(), metadata=metadata,
            mlflow_model=Model(artifact_path=entity.artifact_location, model_uuid=logged.model_id,
                               run_id=tracker.run_id, metadata=metadata, model_id=logged.model_id))
        client.log_model_artifacts(logged.model_id, str(local))
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.set_logged_model_tags(logged.model_id, {S3_URI_KEY: s3_uri, SHA256_KEY: manifest["sha256"]})
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def fail_logged_model(tracker: Tracker, logged: LoggedClassifier) -> None:
    """Mark the logged model FAILED when its publication did not finish (best effort: MLflow may be down)."""
    from contextlib import suppress

    with suppress(Exception):
        tracker.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
