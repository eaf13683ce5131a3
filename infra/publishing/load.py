"""Loading a published model in Python: ``load_published(uri)`` for every strategy.

    from infra.publishing.load import load_published
    model, manifest = load_published("models:/headbench-classifier@champion")  # or s3://bucket/name/run/
    probs = model(normalize_batch(prepare_images(images, manifest["image_size"], manifest["channels"])))

The weights come from the S3 publication, checked against the manifest's sha256, and are read with
safetensors (never unpickled).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from infra.publishing.store import fetch_model
from infra.settings import Settings, load_settings
from infra.storage.s3 import s3_client
from infra.tracking.runs import TrackingError, resolve_registered
from models import HeadNet
from models.predict import model_from_manifest
from models.weights import read_state_dict


def publication_of(uri: str, settings: Settings) -> str:
    """``models:/...`` (registry alias, version or logged model id) or ``s3://...`` -> the S3 prefix."""
    if uri.startswith("s3://"):
        return uri
    if not uri.startswith("models:/"):
        raise TrackingError(f"model {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version>, "
                            "models:/<model id> or s3://bucket/prefix")
    if not settings.mlflow_tracking_uri:
        raise TrackingError(f"model {uri!r} needs MLflow: set MLFLOW_TRACKING_URI or run `headbench up`")
    return resolve_registered(settings.mlflow_tracking_uri, uri)


def load_published(uri: str, settings: Settings | None = None) -> tuple[HeadNet, dict[str, Any]]:
    """A published model in eval mode and its manifest, from a registry URI or its S3 prefix."""
    settings = settings or load_settings()
    source = publication_of(uri, settings)
    with tempfile.TemporaryDirectory() as tmp:
        weights, manifest = fetch_model(s3_client(settings), source, Path(tmp), settings.s3_endpoint_url)
        state = read_state_dict(weights)
    return model_from_manifest(manifest, state), manifest
