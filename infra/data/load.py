"""Where a run's data comes from, by its ``--dataset``: a named dataset (``infra.data.catalogue``), an archive at
an http(s) URL (``infra.data.web``), or an ImageFolder tree in a local directory or under an s3:// prefix
(``infra.data.imagefolder``). Each returns a ``RawDataset`` that ``infra.data.spec.prepare`` splits."""

from __future__ import annotations

from pathlib import Path

from infra.data.catalogue import CATALOGUE, load_named
from infra.data.imagefolder import image_folder_root, read_image_folder
from infra.data.spec import DatasetError, DataSpec, RawDataset, Sources
from infra.data.web import archive_tree
from infra.storage.s3 import S3Error
from infra.uris import public_uri

URL_SCHEMES = ("http://", "https://")


def kind(dataset: str) -> str:
    """named | url | s3 | directory."""
    if dataset in CATALOGUE:
        return "named"
    if dataset.startswith(URL_SCHEMES):
        return "url"
    return "s3" if dataset.startswith("s3://") else "directory"


def allowed() -> str:
    return (f"a named dataset ({', '.join(CATALOGUE)}), a local ImageFolder directory, s3://bucket/prefix or an "
            "http(s):// archive (.tar.gz, .tgz, .tar, .zip)")


def load_raw(spec: DataSpec, cache_dir: Path, sources: Sources | None = None) -> RawDataset:
    """The raw dataset ``spec.dataset`` names, fetched and verified; its ``source`` is where it came from, as
    a URI (lineage)."""
    src = sources or Sources()
    raw = _load(spec, cache_dir, src)
    raw.source = source_uri(spec.dataset, src.mirror)
    return raw


def _load(spec: DataSpec, cache_dir: Path, src: Sources) -> RawDataset:
    dataset = spec.dataset
    if spec.sha256 and kind(dataset) != "url":
        raise DatasetError(f"--dataset-sha256 pins an http(s) archive; {public_uri(dataset)[:120]!r} is a "
                           f"{kind(dataset)} dataset")
    if kind(dataset) == "named":
        return load_named(CATALOGUE[dataset], cache_dir, src)
    if kind(dataset) == "url":
        root, sha256 = archive_tree(dataset, spec.sha256, cache_dir, src)
        raw = read_image_folder(root, spec.image_size, public_uri(dataset))
        raw.archive_sha256 = sha256
        return raw
    if "://" in dataset and not dataset.startswith(("s3://", "file://")):
        raise DatasetError(f"unsupported dataset URI {public_uri(dataset)[:120]!r}; allowed: {allowed()}")
    try:
        return read_image_folder(image_folder_root(dataset, cache_dir, src), spec.image_size, dataset)
    except S3Error as exc:
        raise DatasetError(str(exc)) from None


def source_uri(dataset: str, mirror: str | None = None) -> str:
    """Where a dataset comes from, as a URI (lineage): a named dataset's download folder (the mirror's when
    one is set), the URL or s3:// prefix as given less any credentials and query string, a directory as a
    file:// URI."""
    if kind(dataset) == "named":
        return public_uri(CATALOGUE[dataset].source_uri(mirror))
    if kind(dataset) in ("url", "s3") or dataset.startswith("file://"):
        return public_uri(dataset)
    return Path(dataset).expanduser().resolve().as_uri()
