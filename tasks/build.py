"""Head construction task: resolve the weights spec (torchvision name, S3 URI, registry URI, path) and
build the model with the chosen head strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.data.cache import touch
from infra.errors import retry_transient
from infra.publishing.store import fetch_model
from infra.settings import Settings
from infra.storage.s3 import s3_client
from infra.tracking.runs import resolve_registered
from models import HeadNet, build_model, trainable_parameters
from tasks import TIMEOUT_S
from tasks.data import trim_cache


@dataclass(frozen=True)
class BuiltModel:
    model: HeadNet
    weights_source: str  # what the weights spec resolved to (for MLflow params)
    trainable: int
    total: int

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def resolve_weights(weights: str, settings: Settings) -> str | None:
    """``none`` | torchvision name | local path -> as is; ``s3://`` and ``models:/`` -> a verified local
    copy of the published safetensors."""
    if weights.lower() == "none":
        return None
    if weights.startswith("models:/"):
        if not settings.mlflow_tracking_uri:
            raise ValueError(f"weights {weights!r} need MLflow: set MLFLOW_TRACKING_URI or run `headbench up`")
        weights = resolve_registered(settings.mlflow_tracking_uri, weights)
    if weights.startswith("s3://"):
        dest = settings.cache_dir / "weights" / weights.removeprefix("s3://").strip("/").replace("/", "__")
        path, _ = fetch_model(s3_client(settings), weights, dest, settings.s3_endpoint_url)
        touch(dest)
        trim_cache(settings)
        return str(path)
    return weights


@task(name="build-model", timeout_seconds=TIMEOUT_S["build-model"],
      retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def build_head_model(arch: str, num_classes: int, strategy: str, weights: str, settings: Settings,
                     head: dict[str, Any] | None = None, seed: int | None = None) -> BuiltModel:
    """Build arch + head strategy on top of the resolved pretrained weights (random init seeded by ``seed``);
    ``head``: the head's options (``HeadConfig``: hidden_dim, dropout)."""
    resolved = resolve_weights(weights, settings)
    model = build_model(arch, num_classes, strategy, resolved, **(head or {}), seed=seed)
    return BuiltModel(model, resolved or "none", trainable_parameters(model),
                      sum(p.numel() for p in model.parameters()))
