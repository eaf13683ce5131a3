"""The `retrain` flow: download -> build head -> Ray Train fine-tune -> evaluate -> publish.

Read top-down like a recipe. Parameters are one typed pydantic model, so the Prefect UI renders a form
with help text and the server rejects bad values before anything runs.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.params import RetrainParams
from infra.errors import HeadbenchError
from infra.settings import Settings, load_settings
from infra.tracking import flatten, run_url, start_run
from models import parse_strategy
from models.schedules import describe_plan, phase_params
from tasks.build import build_head_model
from tasks.data import download_data
from tasks.evaluate import evaluate_model, log_learning_curves
from tasks.publish import build_manifest, publish_model
from tasks.train import train_model


class RetrainResult(BaseModel):
    run_id: str
    run_url: str
    s3_uri: str
    registered_model: str
    version: str
    test_accuracy: float
    test_macro_f1: float
    history: list[dict[str, float]]


# The CLI subscribes to stage changes to draw its progress display; flows run fine without a listener.
STAGE_LISTENERS: list[Callable[[str], None]] = []


def stage(name: str) -> None:
    for listener in STAGE_LISTENERS:
        listener(name)


def run_params() -> tuple[dict[str, Any], str]:
    """This flow run's parameters as a dict, and the dataset's short name, for run names."""
    raw = flow_run.get_parameters().get("params") or {}
    p = raw if isinstance(raw, dict) else raw.model_dump()
    return p, str(p.get("dataset", "fashion-mnist")).rstrip("/").rsplit("/", 1)[-1]


def _flow_run_name() -> str:
    p, dataset = run_params()
    return f"{dataset}-{p.get('arch', 'resnet18')}-{p.get('strategy', 'mlp')}-seed{p.get('seed', 0)}"


def require_servers(settings: Settings) -> tuple[str, str]:
    if not settings.mlflow_tracking_uri:
        raise HeadbenchError("MLFLOW_TRACKING_URI is not set and no local stack env file was found; "
                             "run `headbench up` or export MLFLOW_TRACKING_URI")
    if not settings.s3_endpoint_url:
        raise HeadbenchError("AWS_ENDPOINT_URL_S3 is not set and no local stack env file was found; "
                             "run `headbench up` or export AWS_ENDPOINT_URL_S3")
    return settings.mlflow_tracking_uri, settings.s3_endpoint_url


def versions() -> dict[str, str]:
    import mlflow
    import prefect
    import ray
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
            "prefect": prefect.__version__}


@flow(name="retrain", flow_run_name=_flow_run_name, log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> RetrainResult:  # noqa: B008 - pydantic default
    """Fine-tune a ResNet with one head strategy and publish it (S3 + MLflow registry)."""
    settings = load_settings()
    tracking_uri, _ = require_servers(settings)
    spec = parse_strategy(params.strategy)

    stage("download")
    data = download_data(params.data_spec(), settings)

    stage("build")
    built = build_head_model(params.arch, data.num_classes, params.strategy, params.weights, settings,
                             params.hidden_dim, params.dropout)

    tracker = start_run(tracking_uri, settings.experiment, flow_run.get_name() or _flow_run_name(), tags={
        "dataset": params.dataset, "arch": params.arch, "strategy": spec.name, "shape": spec.shape,
        "pool": spec.pool, "schedule": spec.schedule, "seed": str(params.seed),
        "prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or ""})
    try:
        derived: dict[str, Any] = {
            "num_classes": data.num_classes, "class_names": ",".join(data.class_names),
            "class_indices": ",".join(map(str, data.class_indices)), "train_size": len(data.train),
            "val_size": len(data.val), "test_size": len(data.test), "skipped_images": data.skipped,
            "in_features": built.model.in_features, "trainable_params": built.trainable,
            "total_params": built.total, "weights_source": built.weights_source}
        phases = describe_plan(built.model, spec.schedule, params.epochs, params.probe_epochs, params.lr)
        tracker.log_params(params.model_dump() | derived | flatten("version", versions()) | phase_params(phases))
        tracker.log_dict(phases, "training/phases.json")

        stage("train")
        outcome = train_model(params.train_config(spec.name, data.num_classes), data.train, data.val,
                              built.initial_state(), settings, tracking_uri, tracker.run_id, run_key=tracker.run_id)
        built.model.load_state_dict(outcome.state_dict)
        log_learning_curves(outcome.history, tracker)

        stage("evaluate")
        metrics = evaluate_model(built.model, data.test, data.class_names, tracker)

        stage("publish")
        manifest = build_manifest(
            built.model, model_name=params.model_name, class_names=data.class_names,
            class_indices=data.class_indices, image_size=params.image_size,
            data=asdict(params.data_spec()), metrics=metrics.as_dict(), run_id=tracker.run_id,
            hidden_dim=params.hidden_dim, dropout=params.dropout)
        publication = publish_model(built.model, manifest, settings, tracker)
    except BaseException:
        tracker.end("FAILED")  # the run stays, marked failed; nothing half-published is visible
        raise
    tracker.end("FINISHED")
    stage("done")
    return RetrainResult(run_id=tracker.run_id, run_url=run_url(tracking_uri, tracker.run_id),
                         s3_uri=publication.s3_uri, registered_model=publication.registered_model,
                         version=publication.version, test_accuracy=metrics.accuracy,
                         test_macro_f1=metrics.macro_f1, history=outcome.history)
