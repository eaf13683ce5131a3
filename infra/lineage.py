"""Data lineage in MLflow: the train, val and test splits of a run as MLflow datasets (the run page's
"Datasets" column), each with its source URI, a digest of the examples it holds, the class subset and the
split sizes.

A split's digest is a sha256 over (example key, class name) pairs, where a key names the bytes the
example came from (see ``infra.datasets.RawDataset``): the same examples give the same digest whatever the
image size or preprocessing. MLflow keeps 36 characters of a digest; the full ones go to the profile, the
run's params and the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.data
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from infra.datasets import BUILTIN_DATASETS, FASHION_MNIST_URLS, SPLITS, PreparedData
from infra.tracking import Tracker

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow's context tag per split
MLFLOW_DIGEST_CHARS = 32  # the tracking store's digest column holds 36


def source_uri(dataset: str) -> str:
    """Where a dataset comes from, as a URI: a built-in's upstream URL, an s3:// prefix, a file:// path."""
    if dataset in BUILTIN_DATASETS:
        return FASHION_MNIST_URLS[0]
    if dataset.startswith(("s3://", "file://")):
        return dataset
    return Path(dataset).expanduser().resolve().as_uri()


def dataset_name(dataset: str) -> str:
    return dataset.rstrip("/").rsplit("/", 1)[-1] or dataset


def lineage(data: PreparedData, dataset: str) -> dict[str, Any]:
    """What the manifest and the run's params record about the data."""
    return {"source_uri": source_uri(dataset), "files_sha256": data.files_digest,
            "split_sha256": dict(data.digests),
            "split_sizes": {name: len(data.split(name)) for name in SPLITS}}


def split_inputs(data: PreparedData, dataset: str) -> list[DatasetInput]:
    """One MLflow dataset per split, tagged with its context (training, validation, test)."""
    sizes = {name: len(data.split(name)) for name in SPLITS}
    inputs = []
    for name in SPLITS:
        split = data.split(name)
        numpy_ds = mlflow.data.from_numpy(split.images, targets=split.labels, source=source_uri(dataset),
                                          name=f"{dataset_name(dataset)}-{name}",
                                          digest=data.digests[name][:MLFLOW_DIGEST_CHARS])
        config = numpy_ds.to_dict()
        profile = json.loads(config["profile"]) | {
            "split": name, "rows": sizes[name], "split_sizes": sizes, "sha256": data.digests[name],
            "files_sha256": data.files_digest, "classes": data.class_names, "class_indices": data.class_indices}
        entity = Dataset(name=config["name"], digest=config["digest"], source_type=config["source_type"],
                         source=config["source"], schema=config.get("schema"), profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[name])]))
    return inputs


def log_datasets(tracker: Tracker, data: PreparedData, dataset: str) -> None:
    tracker.client.log_inputs(tracker.run_id, datasets=split_inputs(data, dataset))
