"""The `retrain` flow: download -> build head -> Ray Train fine-tune -> evaluate -> publish.

Read top-down like a recipe. Parameters are one typed pydantic model, so the Prefect UI renders a form
with help text and the server rejects bad values before anything runs.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.datasets import FASHION_MNIST_CLASSES, DataSpec
from infra.errors import HeadbenchError
from infra.settings import Settings, load_settings
from infra.tracking import flatten, run_url, start_run
from models import ARCHS, MIN_IMAGE_SIZE, parse_strategy
from models.data import parse_classes
from tasks.build import build_head_model
from tasks.data import download_data
from tasks.evaluate import evaluate_model, log_learning_curves
from tasks.publish import build_manifest, publish_model
from tasks.train import TrainConfig, train_model

Arch = Literal[ARCHS]  # type: ignore[valid-type]  # the dashboard shows a drop-down of these
BUILTIN_CLASSES = {"fashion-mnist": len(FASHION_MNIST_CLASSES)}


class RetrainParams(BaseModel):
    """One retraining run. Every field has a default, a description and bounds."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("fashion-mnist", description="built-in 'fashion-mnist', a local ImageFolder "
                         "directory, or s3://bucket/prefix holding an ImageFolder tree")
    classes: str | None = Field(None, description="class subset, e.g. '0-4' or '0,2,7' (labels are re-indexed "
                                "0..k-1, names kept); empty = all classes", examples=["0-4"])
    limit: int | None = Field(None, ge=10, description="training pool size (train + val), stratified; "
                              "empty = all")
    test_limit: int | None = Field(None, ge=2, description="test set size, stratified; empty = all")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="validation share of the training pool")
    image_size: int = Field(64, ge=MIN_IMAGE_SIZE, le=512, description="square input size in pixels")
    arch: Arch = Field("resnet18", description="torchvision ResNet depth")
    weights: str = Field("none", description="'none', a torchvision weights name (DEFAULT, IMAGENET1K_V1), "
                         "a published model (s3://... or models:/<name>@<alias>) or a local file")
    strategy: str = Field("mlp", description="head strategy <shape>[:<pool>][+<schedule>], e.g. "
                          "'replace-fc', 'mlp', 'mlp:catavgmax'")
    epochs: int = Field(2, ge=1, le=1000, description="training epochs")
    batch_size: int = Field(64, ge=2, le=8192, description="global batch size (split across workers)")
    lr: float = Field(0.01, gt=0.0, le=10.0, description="peak learning rate (SGD, cosine schedule)")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="SGD weight decay")
    hidden_dim: int = Field(512, ge=8, le=8192, description="hidden width of MLP heads")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout of MLP heads")
    workers: int = Field(2, ge=1, le=512, description="Ray Train data-parallel workers")
    cpus_per_worker: int | None = Field(None, ge=1, le=512, description="CPUs per worker; empty = the "
                                        "cluster's CPUs shared evenly")
    use_gpu: bool = Field(False, description="one GPU per worker (bf16 autocast, channels_last)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the data split, init and shuffling")
    model_name: str = Field("headbench-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                            description="registered model name; also the S3 prefix of published models")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return parse_strategy(value).name

    @field_validator("classes")
    @classmethod
    def _classes_syntax(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_classes(value, 10**6)  # syntax only; range is checked against the dataset
            return value.strip()
        return None

    @model_validator(mode="after")
    def _classes_in_range(self) -> RetrainParams:
        if self.classes and self.dataset in BUILTIN_CLASSES:
            parse_classes(self.classes, BUILTIN_CLASSES[self.dataset])
        if self.limit is not None and self.limit < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} is larger than the training pool limit "
                             f"{self.limit}; allowed: batch_size <= limit")
        return self

    def data_spec(self) -> DataSpec:
        return DataSpec(dataset=self.dataset, classes=self.classes, limit=self.limit, test_limit=self.test_limit,
                        val_fraction=self.val_fraction, image_size=self.image_size, seed=self.seed)


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


def _flow_run_name() -> str:
    raw = flow_run.get_parameters().get("params") or {}
    p = raw if isinstance(raw, dict) else raw.model_dump()
    dataset = str(p.get("dataset", "fashion-mnist")).rstrip("/").rsplit("/", 1)[-1]
    return f"{dataset}-{p.get('arch', 'resnet18')}-{p.get('strategy', 'mlp')}-seed{p.get('seed', 0)}"


def require_servers(settings: Settings) -> tuple[str, str]:
    if not settings.mlflow_tracking_uri:
        raise HeadbenchError("MLFLOW_TRACKING_URI is not set and no local stack env file was found; "
                             "run `headbench up` or export MLFLOW_TRACKING_URI")
    if not settings.s3_endpoint_url:
        raise HeadbenchError("AWS_ENDPOINT_URL_S3 is not set and no local stack env file was found; "
                             "run `headbench up` or export AWS_ENDPOINT_URL_S3")
    return settings.mlflow_tracking_uri, settings.s3_endpoint_url


def _versions() -> dict[str, str]:
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
        tracker.log_params(params.model_dump() | derived | flatten("version", _versions()))

        stage("train")
        cfg = TrainConfig(arch=params.arch, strategy=spec.name, num_classes=data.num_classes,
                          epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
                          weight_decay=params.weight_decay, hidden_dim=params.hidden_dim,
                          dropout=params.dropout, workers=params.workers,
                          cpus_per_worker=params.cpus_per_worker, use_gpu=params.use_gpu, seed=params.seed)
        outcome = train_model(cfg, data.train, data.val, built.initial_state(), settings, tracking_uri,
                              tracker.run_id, run_key=tracker.run_id)
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
