"""Publish task: safetensors + manifest to S3 (manifest last), then an MLflow registered model version."""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from infra.errors import retry_transient
from infra.s3 import ModelStore, fetch_model, s3_client
from infra.settings import Settings
from infra.tracking import Tracker, register_version
from models import HeadNet, build_model
from models.data import IMAGENET_MEAN, IMAGENET_STD
from models.weights import WEIGHTS_FILE, read_state_dict, save_state_dict

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Publication:
    s3_uri: str
    registered_model: str
    version: str
    sha256: str


def build_manifest(model: HeadNet, *, model_name: str, class_names: list[str], class_indices: list[int],
                   image_size: int, data: dict[str, Any], metrics: dict[str, float], run_id: str,
                   hidden_dim: int, dropout: float, channels: int = 3) -> dict[str, Any]:
    """Everything needed to rebuild, preprocess for, and trust a published model."""
    return {
        "format_version": MANIFEST_VERSION,
        "model_name": model_name,
        "arch": model.arch,
        "strategy": model.strategy.name,
        "num_classes": model.num_classes,
        "head": {"hidden_dim": hidden_dim, "dropout": dropout},
        "class_names": class_names,
        "class_indices": class_indices,
        "image_size": image_size,
        "channels": channels,  # of the training images: 1 = grayscale (replicated to RGB at the stem)
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "input": "uint8 RGB (grayscale replicated), resized, /255, then (x-mean)/std"},
        "data": data,
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }


@task(name="publish", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def publish_model(model: nn.Module, manifest: dict[str, Any], settings: Settings, tracker: Tracker) -> Publication:
    """Upload weights and manifest (manifest last, never overwriting), tag the run, register a version."""
    name, run_id = manifest["model_name"], manifest["mlflow_run_id"]
    store = ModelStore(s3_client(settings), settings.model_bucket, settings.s3_endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_state_dict(model, weights)
        published = store.publish(name, run_id, weights, manifest)
    tracker.set_tags({"model_s3_uri": published.uri, "model_sha256": published.manifest["sha256"]})
    tracker.log_dict(published.manifest, "model/manifest.json")
    version = register_version(
        tracker.tracking_uri, name, published.uri, run_id,
        tags={"arch": manifest["arch"], "strategy": manifest["strategy"], "sha256": published.manifest["sha256"],
              "test_accuracy": f"{manifest['metrics'].get('test_accuracy', float('nan')):.6f}"},
        description=f"{manifest['arch']} {manifest['strategy']} on {manifest['data'].get('dataset')}")
    return Publication(published.uri, name, version, published.manifest["sha256"])


def load_published(uri: str, settings: Settings) -> tuple[HeadNet, dict[str, Any]]:
    """Fetch a published model from S3, verify its sha256, rebuild it from the manifest (safe loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, manifest = fetch_model(s3_client(settings), uri, Path(tmp), settings.s3_endpoint_url)
        state = read_state_dict(weights)
    head = manifest.get("head", {})
    model = build_model(manifest["arch"], manifest["num_classes"], manifest["strategy"], None,
                        hidden_dim=head.get("hidden_dim", 512), dropout=head.get("dropout", 0.2))
    model.load_state_dict(state, strict=True)
    return model.eval(), manifest
