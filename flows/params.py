"""Typed flow parameters: one pydantic model per flow, with descriptions, defaults and bounds.

Prefect renders them as the deployment's form in the UI and validates them server-side; the CLI builds the
same models, so a bad value gets the same one-line error everywhere.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from infra.data.archives import archive_suffix
from infra.data.catalogue import CATALOGUE
from infra.data.spec import DataSpec
from infra.training.cluster import Resources
from infra.training.worker import Checkpoints, Compute, TrainConfig
from infra.uris import public_name, public_uri
from models import ARCHS, MIN_IMAGE_SIZE, parse_strategy
from models.data import check_batch_split, parse_class_ranges, parse_classes
from models.heads import HeadConfig
from models.loop import FitConfig
from models.options import declared_options, option_values
from models.schedules import plan
from models.strategies import DEMO_STRATEGIES, all_strategies

Arch = Literal[ARCHS]  # type: ignore[valid-type]  # the dashboard shows a drop-down of these
# Strategy fields accept any spelling parse_strategy understands (e.g. 'mlp:avg'), but the JSON schema the
# Prefect server enforces lists the canonical names, so the Custom Run form offers a drop-down.
STRATEGY_ENUM = {"enum": all_strategies()}
WarmStart = Literal["none", "champion"]
Promote = Literal["never", "if-better", "always"]
PromotionMetric = Literal["test_accuracy", "test_macro_f1"]
Tune = Literal["none", "lr"]
# The class-list syntax, in the JSON schema the Prefect server enforces (409 before a flow run exists); the
# validator below gives the CLI its friendlier message, and checks what a pattern cannot (5-2, the range).
CLASSES_PATTERN = r"^\s*(all|\d{1,12}(\s*-\s*\d{1,12})?(\s*,\s*\d{1,12}(\s*-\s*\d{1,12})?)*)?\s*$"
NAMED_CLASSES = {name: len(entry.classes) for name, entry in CATALOGUE.items()}
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


def option_fields(*configs: type, **defaults: Any) -> dict[str, Any]:
    """pydantic field definitions (for ``create_model``) of every user option the dataclasses ``configs``
    declare with ``models.options.option``: type, default, description and bounds come from there."""
    fields: dict[str, Any] = {}
    for config in configs:
        for declared in declared_options(config):
            spec = declared.option
            annotation = Literal[spec.choices] if spec.choices else declared.type  # a drop-down in the form
            fields[declared.name] = (annotation, Field(defaults.get(declared.name, declared.default),
                                                       description=spec.help, **spec.bounds()))
    return fields


def with_default(model: type[BaseModel], name: str, default: Any) -> Any:
    """Field ``name`` of ``model`` as declared (type, help, bounds) with another default, for a subclass."""
    info = copy.copy(model.model_fields[name])
    info.default = default
    return info


class DataParams(BaseModel):
    """Which images, at what size, into which backbone."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("fashion-mnist", description=f"a named dataset ({', '.join(CATALOGUE)}; `headbench "
                         "datasets`), a local ImageFolder directory, s3://bucket/prefix holding an ImageFolder tree, "
                         "or an http(s) URL of an ImageFolder archive (.tar.gz, .tgz, .tar, .zip)")
    dataset_sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="sha256 of the http(s) "
                                       "archive (as `sha256sum` prints it): a download with other content is "
                                       "refused; empty = take what the URL serves, and record its sha256")
    classes: str | None = Field(None, description="class subset, e.g. '0-4' or '0,2,7' (labels are re-indexed "
                                "0..k-1, names kept); empty = all classes", examples=["0-4"],
                                json_schema_extra={"pattern": CLASSES_PATTERN})
    limit: int | None = Field(None, ge=10, description="training pool size (train + val), stratified; "
                              "empty = all")
    test_limit: int | None = Field(None, ge=2, description="test set size, stratified; empty = all")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="validation share of the training pool")
    image_size: int = Field(64, ge=MIN_IMAGE_SIZE, le=512, description="square input size in pixels")
    arch: Arch = Field("resnet18", description="torchvision ResNet depth")
    weights: str = Field("none", description="'none', a torchvision weights name (DEFAULT, IMAGENET1K_V1), "
                         "a published model (s3://... or models:/NAME@ALIAS) or a local file")


# The training knobs are declared once, where they are used: the loop's recipe (FitConfig), the head
# (HeadConfig), the Ray resources (Resources), the worker's checkpoints (Checkpoints) and computation (Compute);
# these parameters, the Prefect form and the CLI follow.
_TrainingFields = create_model("_TrainingFields", __base__=DataParams,
                               **option_fields(FitConfig, HeadConfig, Resources, Checkpoints, Compute))


class TrainingParams(_TrainingFields):  # type: ignore[misc, valid-type]
    """What every run shares: data, backbone, recipe and resources."""

    @field_validator("classes")
    @classmethod
    def _classes_syntax(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_class_ranges(value)  # syntax only; the range is checked against the dataset
            return value.strip()
        return None

    @model_validator(mode="after")
    def _consistent(self) -> TrainingParams:
        if self.classes and self.dataset in NAMED_CLASSES:
            parse_classes(self.classes, NAMED_CLASSES[self.dataset])
        url = self.dataset.startswith(("http://", "https://"))
        if self.dataset_sha256 and not url:
            raise ValueError(f"dataset_sha256 pins an http(s) archive, but dataset {public_uri(self.dataset)[:80]!r} "
                             "is not a URL; allowed: dataset_sha256 only with an http(s) dataset")
        if url and archive_suffix(self.dataset.rsplit("/", 1)[-1]) is None:
            raise ValueError(f"dataset URL {public_uri(self.dataset)[:120]!r} does not name an archive; allowed: a "
                             "URL ending in .tar.gz, .tgz, .tar or .zip")
        check_batch_split(self.batch_size, self.workers)
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs GPUs (--gpu): CPU autocast runs bf16 only; allowed on CPU: "
                             "auto, bf16, fp32")
        if self.limit is not None and self.limit < self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} is larger than the training pool limit "
                             f"{self.limit}; allowed: batch_size <= limit")
        for strategy in self.strategy_names():
            plan(parse_strategy(strategy).schedule, self.epochs, self.probe_epochs)  # raises on bad combos
        return self

    def strategy_names(self) -> list[str]:
        return []

    def train_config(self, strategy: str, num_classes: int, *, seed: int | None = None,
                     cpus_per_worker: int | None = None, lr: float | None = None) -> TrainConfig:
        """The Ray training config for one strategy (and seed, CPUs per worker, LR) under these parameters."""
        fit = FitConfig(**option_values(FitConfig, self))
        resources = Resources(**option_values(Resources, self))
        return TrainConfig(arch=self.arch, strategy=strategy, num_classes=num_classes,
                           fit=replace(fit, seed=fit.seed if seed is None else seed, lr=fit.lr if lr is None else lr),
                           resources=replace(resources, cpus_per_worker=cpus_per_worker or resources.cpus_per_worker),
                           head=self.head_options(), checkpoints=Checkpoints(**option_values(Checkpoints, self)),
                           compute=Compute(**option_values(Compute, self)))

    def head_options(self) -> dict[str, Any]:
        """The new head's options (``HeadConfig``: hidden_dim, dropout), as ``build_model`` takes them."""
        return option_values(HeadConfig, self)

    def recorded(self, **dump: Any) -> dict[str, Any]:
        """``model_dump`` as MLflow and the manifest record it: the dataset URI without credentials or query
        string (the request itself uses it whole)."""
        return self.model_dump(**dump) | {"dataset": public_uri(self.dataset)}

    def data_spec(self) -> DataSpec:
        return DataSpec(dataset=self.dataset, sha256=self.dataset_sha256.lower() if self.dataset_sha256 else None,
                        classes=self.classes, limit=self.limit, test_limit=self.test_limit,
                        val_fraction=self.val_fraction, image_size=self.image_size, seed=self.seed)


class RetrainParams(TrainingParams):
    """One retraining run, published to S3 and the MLflow registry."""

    strategy: str = Field("mlp", description="head strategy SHAPE[:POOL][+SCHEDULE], e.g. "
                          "'replace-fc', 'mlp', 'mlp+lp-ft', 'replace-fc+linear-probe'",
                          json_schema_extra=STRATEGY_ENUM)
    model_name: str = Field("headbench-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                            description="registered model name; also the S3 prefix of published models")
    warm_start: WarmStart = Field("none", description="'champion': start from the weights of the current "
                                  "champion of model_name (falls back to `weights` when there is none yet)")
    promote: Promote = Field("if-better", description="move the 'champion' alias to this run's version: "
                             "'if-better' than the champion on this run's test split, 'always' or 'never'")
    promotion_metric: PromotionMetric = Field("test_accuracy", description="test metric that decides promotion")
    min_margin: float = Field(0.0, ge=0.0, le=1.0, description="'if-better' needs challenger > champion + "
                              "min_margin on promotion_metric")
    resume_run_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="MLflow run id of an "
                                      "unfinished retrain with the same parameters: continue that run from its "
                                      "last S3 checkpoint instead of starting over")
    skip_if_unchanged: bool = Field(False, description="train nothing when the champion of model_name was "
                                    "trained on the same data (digest of every file read) with the same "
                                    "training parameters; the flow run completes with 'skipped: nothing changed'")

    def identity(self) -> dict[str, str]:
        """What must match for a resume, or for skip_if_unchanged: everything that shapes data, model and
        training (as MLflow params)."""
        skip = {"resume_run_id", "promote", "promotion_metric", "min_margin", "placement_strategy",
                "skip_if_unchanged", "checkpoint_every", "checkpoint_upload"}
        return {k: str(v) for k, v in self.recorded().items() if k not in skip}

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return parse_strategy(value).name

    def strategy_names(self) -> list[str]:
        return [self.strategy]


class CompareParams(TrainingParams):
    """Every strategy x seed on the same data split and budget, as children of one MLflow parent run."""

    strategies: list[str] = Field(list(DEMO_STRATEGIES), min_length=1, max_length=32,
                                  description="head strategies to compare (see `headbench strategies`)",
                                  json_schema_extra={"items": {"type": "string"} | STRATEGY_ENUM})
    seeds: int = Field(2, ge=1, le=20, description="repetitions per strategy (seed, seed+1, ...); the data "
                       "split stays fixed")
    workers: int = with_default(TrainingParams, "workers", 1)  # children train side by side, one worker each
    parallel: int | None = Field(None, ge=1, le=64, description="children trained at once; empty = as many as "
                                 "the Ray cluster's CPUs allow")
    tune: Tune = Field("none", description="'lr': before the seeds, search each strategy's LR on the validation "
                       "split with Ray Tune (log-spaced grid over 3 decades around lr, ASHA early stopping, the same "
                       "trial budget for every strategy); 'none': every strategy trains at lr")
    tune_trials: int = Field(6, ge=2, le=32, description="--tune lr: LR values tried per strategy")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, values: list[str]) -> list[str]:
        names = [parse_strategy(v).name for v in values]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"strategies listed twice: {', '.join(duplicates)}")
        return names

    def strategy_names(self) -> list[str]:
        return self.strategies


# The demo (`headbench demo`, and part (c) of the quality benchmark): a source model trained on one half of
# Fashion-MNIST's classes, then the head strategies compared on the other half, starting from its weights.
DEMO_SOURCE = {"dataset": "fashion-mnist", "classes": "0-4", "limit": 2000, "test_limit": 500, "image_size": 32,
               "arch": "resnet18", "weights": "none", "strategy": "mlp", "epochs": 3, "batch_size": 64, "lr": 0.05,
               "workers": 2, "model_name": "demo-source-fashion-0-4"}
DEMO_TARGET = {"dataset": "fashion-mnist", "classes": "5-9", "limit": 500, "test_limit": 500, "image_size": 32,
               "arch": "resnet18", "epochs": 2, "batch_size": 32, "lr": 0.01, "workers": 1, "cpus_per_worker": 1,
               "seeds": 2}


# Fashion-MNIST only (it ships with the set-up): two classes or ten, few images or many
SMALL_GRID = "fashion-mnist 0-1 200; fashion-mnist 0-9 300; fashion-mnist 0-9 1500"


class GridCell(BaseModel):
    dataset: str
    classes: str | None
    limit: int | None

    def label(self, arch: str) -> str:
        images = f"{self.limit} images" if self.limit else "all images"
        return f"{public_name(self.dataset)} {self.classes or 'all'}, {images}, {arch}"


def parse_grid(text: str) -> list[GridCell]:
    """``"DATASET CLASSES LIMIT; ..."``: CLASSES is a class list (`0-4`, `0,2,7`) or `all`, LIMIT an image count or
    `all`; a dataset is anything `--dataset` takes."""
    cells = []
    for chunk in (c.strip() for c in text.split(";")):
        if not chunk:
            continue
        parts = chunk.split()
        if len(parts) != 3 or not (parts[2] == "all" or parts[2].isdigit()):
            raise ValueError(f"grid cell {chunk[:80]!r}: expected 'DATASET CLASSES LIMIT', e.g. 'fashion-mnist 0-4 "
                             "500' or 'cifar10 all all'")
        cells.append(GridCell(dataset=parts[0], classes=None if parts[1] == "all" else parts[1],
                              limit=None if parts[2] == "all" else int(parts[2])))
    if not cells:
        raise ValueError("grid: no cell; expected 'DATASET CLASSES LIMIT; ...'")
    return cells


class StudyParams(CompareParams):
    """A grid of comparisons; the comparison's own fields are every cell's budget and recipe, but the data and
    backbone, which each cell sets (``CELL_FIELDS``)."""

    CELL_FIELDS: ClassVar[tuple[str, ...]] = ("dataset", "dataset_sha256", "classes", "limit", "arch")

    grid: str = Field(SMALL_GRID, description="the cells: 'DATASET CLASSES LIMIT; ...' (CLASSES a class list or "
                      "'all', LIMIT an image count or 'all'); DATASET is anything --dataset takes")
    archs: list[Arch] = Field(["resnet18"], min_length=1, max_length=5,  # type: ignore[valid-type]
                              description="backbones: every cell runs on each")
    strategies: list[str] = with_default(CompareParams, "strategies", ["replace-fc", "mlp", "replace-fc+linear-probe"])

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: str) -> str:
        parse_grid(value)
        return value

    def cells(self) -> list[tuple[str, CompareParams]]:
        """(label, the cell's comparison parameters) for every grid cell x arch."""
        base = self.model_dump(exclude={"grid", "archs"})
        return [(cell.label(arch), CompareParams(**(base | {"dataset": cell.dataset, "classes": cell.classes,
                                                             "limit": cell.limit, "arch": arch})))
                for cell in parse_grid(self.grid) for arch in self.archs]
