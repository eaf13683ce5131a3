"""What a dataset is to the pipeline, wherever it comes from: raw arrays with a key per example
(``RawDataset``), the spec of a run's data (``DataSpec``), and ``prepare``, which turns raw data into seeded,
stratified, resized splits (``PreparedData``) with a digest per split.

The sources live beside this module and all return a ``RawDataset``: named datasets (``infra.data.catalogue``),
ImageFolder trees from a directory or S3 (``infra.data.imagefolder``) and archives at http(s) URLs
(``infra.data.web``); ``infra.data.load.load_raw`` picks one by the dataset's name or URI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infra.errors import HeadbenchError
from infra.uris import public_uri
from models.data import (
    ArraySplit,
    parse_classes,
    resize_uint8,
    select_classes,
    stratified_split,
    stratified_subset,
)

if TYPE_CHECKING:
    from infra.settings import Settings


class DatasetError(HeadbenchError):
    """Missing, corrupt or malformed data; the message names the file or URI and what was expected."""


@dataclass
class RawDataset:
    """Images as uint8 arrays (N, H, W) or (N, C, H, W), integer labels, and the class names.

    Every example has a key naming the bytes it came from (an image file's sha256, or a data file's checksum
    and the row), so a split's digest says which examples it holds whatever the image size;
    ``files_digest`` covers every file or object read, the unreadable ones too."""

    train_images: Any  # np.ndarray, or an ImageFolder's images decoded when indexed (infra.data.imagefolder)
    train_labels: np.ndarray
    test_images: Any | None
    test_labels: np.ndarray | None
    class_names: list[str]
    source: str
    skipped: int = 0  # unreadable images skipped
    train_keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    test_keys: np.ndarray | None = None
    files_digest: str = ""
    archive_sha256: str = ""  # the archive the tree was extracted from (http(s) sources)


@dataclass
class Sources:
    """Where data may come from besides the local cache, and the bounds on what is unpacked."""

    s3: Any | None = None  # boto3 client: the data bucket's mirror, and s3:// ImageFolder prefixes
    bucket: str | None = None  # the data bucket
    endpoint: str | None = None
    mirror: str | None = None  # HEADBENCH_DATASET_MIRROR: replaces named datasets' upstream hosts
    download: bool = True  # False: no URL is tried (cache, local folders and S3 only)
    local_dirs: Sequence[Path] | None = None  # Fashion-MNIST's local folders (default: the Debian package's)
    member_limit: int = 2 * 1024**3  # bytes per archive member
    total_limit: int = 20 * 1000**3  # bytes of an extracted archive
    tried: list[str] = field(default_factory=list)  # what failed, for the error when nothing worked

    @classmethod
    def from_settings(cls, settings: Settings, s3: Any | None = None) -> Sources:
        return cls(s3=s3, bucket=settings.data_bucket, endpoint=settings.s3_endpoint_url,
                   mirror=settings.dataset_mirror, member_limit=int(settings.archive_member_limit_mb * 1e6),
                   total_limit=int(settings.cache_limit_gb * 1e9))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_lines(lines: Sequence[str]) -> str:
    """sha256 over sorted lines: a digest of a set of files or examples, independent of listing order."""
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def row_keys(prefix: str, count: int) -> np.ndarray:
    """Example keys of a data file's rows: ``<prefix>:<row>`` (the prefix names the file's content)."""
    return np.array([f"{prefix}:{i}" for i in range(count)], dtype=object)


def parse_idx(data: bytes) -> np.ndarray:
    """IDX format (MNIST's; big-endian): magic (0, 0, dtype=0x08 uint8, ndim), ndim uint32 dims, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError("not an IDX uint8 file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"IDX file of {len(data)} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


# ----------------------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class DataSpec:
    """What to train and test on; everything a run needs to rebuild exactly the same splits."""

    dataset: str = "fashion-mnist"  # a named dataset, a local directory, s3://bucket/prefix or an http(s) archive
    sha256: str | None = None  # an http(s) archive's pinned sha256
    classes: str | None = None  # "0-4", "0,2,7" or None for all
    limit: int | None = None  # training pool size (train + val), stratified
    test_limit: int | None = None  # test set size, stratified
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # carved from the data when the dataset has no test split
    image_size: int = 64
    seed: int = 0


SPLITS = ("train", "val", "test")


@dataclass
class PreparedData:
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    class_names: list[str]  # names of the selected classes, in label order 0..k-1
    class_indices: list[int]  # their indices in the source dataset
    source: str
    skipped: int = 0
    files_digest: str = ""  # sha256 over every file or object read (the source's digest)
    archive_sha256: str = ""  # an http(s) archive's sha256 ("" for other sources)
    digests: dict[str, str] = field(default_factory=dict)  # per split: sha256 over (example key, class name)

    def split(self, name: str) -> ArraySplit:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _keys(keys: np.ndarray | None, count: int) -> np.ndarray:
    """A raw dataset's example keys, or row numbers for arrays built without them."""
    return keys if keys is not None and len(keys) == count else np.arange(count).astype(str).astype(object)


def prepare(raw: RawDataset, spec: DataSpec) -> PreparedData:
    """Class subset -> stratified limit -> seeded stratified train/val split -> resize to uint8 tensors."""
    try:
        classes = parse_classes(spec.classes, len(raw.class_names))
    except ValueError as exc:
        raise DatasetError(f"{exc} (dataset {public_uri(spec.dataset)})") from None
    pool_idx, pool_y = select_classes(raw.train_labels, classes)
    train_keys = _keys(raw.train_keys, len(raw.train_labels))
    # Indices first, images last: an ImageFolder decodes only the examples indexed (DecodedOnRead)
    if raw.test_images is not None and raw.test_labels is not None:
        test_idx, test_y = select_classes(raw.test_labels, classes)
        test_source, test_keys = raw.test_images, _keys(raw.test_keys, len(raw.test_labels))[test_idx]
    else:  # no official test split: hold out a stratified, seeded part of the data
        keep, held = stratified_split(pool_y, spec.test_fraction, spec.seed + 1)
        test_source, test_idx, test_y = raw.train_images, pool_idx[held], pool_y[held]
        test_keys = train_keys[test_idx]
        pool_idx, pool_y = pool_idx[keep], pool_y[keep]
    if spec.limit is not None:
        chosen = stratified_subset(pool_y, spec.limit, spec.seed)
        pool_idx, pool_y = pool_idx[chosen], pool_y[chosen]
    if spec.test_limit is not None:
        chosen = stratified_subset(test_y, spec.test_limit, spec.seed)
        test_idx, test_y, test_keys = test_idx[chosen], test_y[chosen], test_keys[chosen]
    train_i, val_i = stratified_split(pool_y, spec.val_fraction, spec.seed)
    pool_x, pool_keys = raw.train_images[pool_idx], train_keys[pool_idx]
    test_x = test_source[test_idx]
    names = [raw.class_names[c] for c in classes]

    def digest(keys: np.ndarray, labels: np.ndarray) -> str:
        # which examples, with which label name: the same whatever the image size or the classes' order
        return digest_lines([f"{k}\t{names[y]}" for k, y in zip(keys, labels.tolist(), strict=True)])

    return PreparedData(
        train=ArraySplit(resize_uint8(pool_x[train_i], spec.image_size), pool_y[train_i]),
        val=ArraySplit(resize_uint8(pool_x[val_i], spec.image_size), pool_y[val_i]),
        test=ArraySplit(resize_uint8(test_x, spec.image_size), test_y),
        class_names=names,
        class_indices=classes,
        source=raw.source,
        skipped=raw.skipped,
        files_digest=raw.files_digest,
        archive_sha256=raw.archive_sha256,
        digests={"train": digest(pool_keys[train_i], pool_y[train_i]), "val": digest(pool_keys[val_i], pool_y[val_i]),
                 "test": digest(test_keys, test_y)},
    )
