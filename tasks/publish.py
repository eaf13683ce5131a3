"""Publish task: safetensors + manifest to S3 (manifest last), the same files as an MLflow pyfunc logged
model, then a registered model version whose source is that logged model; once published, the run's Ray
Train checkpoints are pruned to the newest ``HEADBENCH_KEEP_CHECKPOINTS``."""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from infra.errors import retry_transient
from infra.publishing.logged_model import fail_logged_model, finish_logged_model, input_example, start_logged_model
from infra.publishing.store import ModelStore
from infra.settings import Settings
from infra.storage.checkpoints import prune_checkpoints
from infra.storage.s3 import S3Error, s3_client
from infra.tracking.runs import Tracker, register_version
from infra.training.trainer import RAY_TRAIN_PREFIX
from models import HeadNet
from models.data import IMAGENET_MEAN, IMAGENET_STD
from models.weights import WEIGHTS_FILE, save_state_dict
from tasks import TIMEOUT_S

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Publication:
    s3_uri: str
    registered_model: str
    version: str
    sha256: str
    model_uri: str  # the MLflow logged model, models:/<model id>


def build_manifest(model: HeadNet, *, model_name: str, class_names: list[str], class_indices: list[int],
                   image_size: int, data: dict[str, Any], lineage: dict[str, Any], metrics: dict[str, float],
                   run_id: str,
                   head: dict[str, Any], channels: int = 3) -> dict[str, Any]:
    """Everything needed to rebuild, preprocess for, and trust a published model."""
    return {
        "format_version": MANIFEST_VERSION,
        "model_name": model_name,
        "arch": model.arch,
        "strategy": model.strategy.name,
        "num_classes": model.num_classes,
        "head": head,  # HeadConfig's options: hidden_dim, dropout
        "class_names": class_names,
        "class_indices": class_indices,
        "image_size": image_size,
        "channels": channels,  # of the training images: 1 = grayscale (replicated to RGB at the stem)
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "input": "uint8 RGB (grayscale replicated), resized, /255, then (x-mean)/std"},
        "data": data,
        "lineage": lineage,  # source URI, digests of the files read and of each split, split sizes
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }


@task(name="publish", timeout_seconds=TIMEOUT_S["publish"],
      retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def publish_model(model: nn.Module, manifest: dict[str, Any], example_images: np.ndarray, settings: Settings,
                  tracker: Tracker) -> Publication:
    """Upload weights and manifest (manifest last, never overwriting), log them as the run's MLflow model,
    tag the run, register a version of that model. ``example_images``: (N, C, S, S) uint8 test images, two
    of which become the logged model's input example."""
    name, run_id = manifest["model_name"], manifest["mlflow_run_id"]
    store = ModelStore(s3_client(settings), settings.model_bucket, settings.s3_endpoint_url)
    experiment_id = tracker.client.get_run(run_id).info.experiment_id
    logged = start_logged_model(tracker, experiment_id, {"arch": manifest["arch"], "strategy": manifest["strategy"]})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / WEIGHTS_FILE
            key_format = save_state_dict(model, weights)
            published = store.publish(name, run_id, weights, manifest | {"key_format": key_format,
                                                                         "mlflow_model_uri": logged.uri})
            finish_logged_model(tracker, logged, weights, published.manifest, published.uri,
                                input_example(example_images))
    except BaseException:
        fail_logged_model(tracker, logged)  # a retry or a resume of this run reuses it and marks it READY
        raise
    sha256 = published.manifest["sha256"]
    tracker.set_tags({"model_s3_uri": published.uri, "model_sha256": sha256, "model_uri": logged.uri})
    tracker.log_dict(published.manifest, "model/manifest.json")
    version = register_version(
        tracker.tracking_uri, name, logged.uri, run_id, model_id=logged.model_id,
        tags={"arch": manifest["arch"], "strategy": manifest["strategy"], "sha256": sha256, "s3_uri": published.uri,
              "test_accuracy": f"{manifest['metrics'].get('test_accuracy', float('nan')):.6f}"},
        description=f"{manifest['arch']} {manifest['strategy']} on {manifest['data'].get('dataset')}")
    return Publication(published.uri, name, version, sha256, logged.uri)


@task(name="prune-checkpoints", timeout_seconds=TIMEOUT_S["prune-checkpoints"], cache_policy=NO_CACHE)
def prune_run_checkpoints(run_key: str, settings: Settings) -> list[str]:
    """After a successful publish: delete all but the newest ``settings.keep_checkpoints`` of the run's
    checkpoints in S3. The model is already safe, so a failure here is a warning, not a failed run."""
    try:
        removed = prune_checkpoints(s3_client(settings), settings.checkpoint_bucket, f"{RAY_TRAIN_PREFIX}/{run_key}",
                                    settings.keep_checkpoints, settings.s3_endpoint_url)
    except S3Error as exc:
        get_run_logger().warning("checkpoints of run %s not pruned: %s", run_key, exc)
        return []
    get_run_logger().info("pruned %d checkpoint(s) of run %s, kept the newest %d", len(removed), run_key,
                          settings.keep_checkpoints)
    return removed
