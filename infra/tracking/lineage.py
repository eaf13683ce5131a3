"""Data lineage in MLflow: the train, val and test splits of a run as MLflow datasets (the run page's
"Datasets" column), each with its source URI, a digest of the examples it holds, the class subset and the
split sizes.

A split's digest is a sha256 over (example key, class name) pairs, where a key names the bytes the
example came from (see ``infra.data.spec.RawDataset``): the same examples give the same digest whatever the
image size or preprocessing. MLflow keeps 36 characters of a digest; the full ones go to the profile, the
run's params and the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.data
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from infra.data.spec import SPLITS, PreparedData
from infra.tracking.runs import Tracker

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow's context tag per split
MLFLOW_DIGEST_CHARS = 32  # the tracking store's digest column holds 36


def dataset_name(dataset: str) -> str:
    return dataset.rstrip("/").rsplit("/", 1)[-1] or dataset


def lineage(data: PreparedData) -> dict[str, Any]:
    """What the manifest and the run's params record about the data: where it came from (and the archive's
    sha256 for an http(s) source), a digest of every file read, and each split's digest and size."""
    return {"source_uri": data.source, "files_sha256": data.files_digest,
            **({"archive_sha256": data.archive_sha256} if data.archive_sha256 else {}),
            "split_sha256": dict(data.digests),
            "split_sizes": {name: len(data.split(name)) for name in SPLITS}}


def split_inputs(data: PreparedData, dataset: str) -> list[DatasetInput]:
    """One MLflow dataset per split, tagged with its context (training, validation, test)."""
    sizes = {name: len(data.split(name)) for name in SPLITS}
    inputs = []
    for name in SPLITS:
        split = data.split(name)
        numpy_ds = mlflow.data.from_numpy(split.images, targets=split.labels, source=data.source,
                                          name=f"{dataset_name(dataset)}-{name}",
                                          digest=data.digests[name][:MLFLOW_DIGEST_CHARS])
        config = numpy_ds.to_dict()
        profile = json.loads(config["profile"]) | {
            "split": name, "rows": sizes[name], "split_sizes": sizes, "sha256": data.digests[name],
            "files_sha256": data.files_digest, "classes": data.class_names, "class_indices": data.class_indices,
            **({"archive_sha256": data.archive_sha256} if data.archive_sha256 else {})}
        entity = Dataset(name=config["name"], digest=config["digest"], source_type=config["source_type"],
                         source=config["source"], schema=config.get("schema"), profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[name])]))
    return inputs


def log_datasets(tracker: Tracker, data: PreparedData, dataset: str) -> None:
    tracker.client.log_inputs(tracker.run_id, datasets=split_inputs(data, dataset))
