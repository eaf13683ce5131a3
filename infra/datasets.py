"""Dataset sources: the built-in Fashion-MNIST and ImageFolder trees (local directory or s3:// prefix).

Fashion-MNIST is taken, in order, from the local cache, its official URLs, the Debian package files
(``dataset-fashion-mnist``) and finally the S3 data bucket mirror; every file is verified against the
published checksum of its decompressed content before it is cached and mirrored to S3 (so Ray workers on
other machines, and machines without the Debian package, can read it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.cache import touch
from infra.errors import HeadbenchError
from infra.s3 import S3Error, object_exists, s3_errors, split_uri
from models.data import (
    ArraySplit,
    parse_classes,
    resize_uint8,
    select_classes,
    stratified_split,
    stratified_subset,
)

log = logging.getLogger(__name__)


class DatasetError(HeadbenchError):
    """Missing, corrupt or malformed data; the message names the file or URI and what was expected."""


# ----------------------------------------------------------------------------------------- Fashion-MNIST


@dataclass(frozen=True)
class RawFile:
    name: str
    gz_md5: str  # published MD5 of the official .gz (zalandoresearch/fashion-mnist README)
    sha256: str  # SHA-256 of the decompressed content: the same for the official and Debian files
    size: int  # decompressed bytes


FASHION_MNIST_FILES: tuple[RawFile, ...] = (
    RawFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    RawFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    RawFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    RawFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
)
FASHION_MNIST_CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                          "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_URLS: tuple[str, ...] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS = ("fashion-mnist",)
MAX_CORRUPT_FRACTION = 0.1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class RawDataset:
    """Images as uint8 arrays (N, H, W) or (N, C, H, W), integer labels, and the class names.

    Every example has a key naming the bytes it came from (an image file's sha256, or a Fashion-MNIST
    file's sha256 and the row), so a split's digest says which examples it holds whatever the image size;
    ``files_digest`` covers every file or object read, the unreadable ones too."""

    train_images: np.ndarray | DecodedOnRead  # an ImageFolder's are decoded when indexed
    train_labels: np.ndarray
    test_images: np.ndarray | DecodedOnRead | None
    test_labels: np.ndarray | None
    class_names: list[str]
    source: str
    skipped: int = 0  # unreadable images skipped
    train_keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    test_keys: np.ndarray | None = None
    files_digest: str = ""


def digest_lines(lines: Sequence[str]) -> str:
    """sha256 over sorted lines: a digest of a set of files or examples, independent of listing order."""
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_idx(data: bytes) -> np.ndarray:
    """IDX format (big-endian): magic (0, 0, dtype=0x08 uint8, ndim), ndim uint32 dims, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError("not an IDX uint8 file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


@dataclass
class FashionMnistSources:
    """Where Fashion-MNIST may come from; tests swap these for local fixtures."""

    urls: Sequence[str] = FASHION_MNIST_URLS
    local_dirs: Sequence[Path] = (DEBIAN_DIR,)
    s3: Any | None = None  # boto3 client for the data-bucket mirror
    bucket: str | None = None
    endpoint: str | None = None
    timeout: float = 10.0
    tried: list[str] = field(default_factory=list)


def _fetch_url(url: str, timeout: float) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) mirror URL
            return resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.info("cannot download %s: %s", url, exc)
        return None


def _fetch_fashion_file(f: RawFile, cache: Path, src: FashionMnistSources) -> bytes:
    """Decompressed, verified content of one file; cached in ``cache`` and mirrored to S3."""
    cached = cache / f.name.removesuffix(".gz")
    if cached.is_file():
        data = cached.read_bytes()
        if _sha256(data) == f.sha256:
            return data
        log.warning("cached %s fails its checksum; fetching it again", cached)

    def verified(data: bytes | None, where: str, *, gz: bool = True) -> bytes | None:
        if data is None:
            return None
        try:
            raw = gzip.decompress(data) if gz else data
        except (OSError, EOFError) as exc:
            src.tried.append(f"{where}: not a valid gzip file ({exc})")
            return None
        if _sha256(raw) != f.sha256:
            src.tried.append(f"{where}: checksum mismatch (sha256 {_sha256(raw)[:12]}... != {f.sha256[:12]}...)")
            return None
        return raw

    candidates: list[tuple[str, Callable[[], bytes | None], bool]] = []
    candidates += [(base + f.name, lambda u=base + f.name: _fetch_url(u, src.timeout), True) for base in src.urls]
    candidates += [(str(d / f.name), lambda p=d / f.name: p.read_bytes() if p.is_file() else None, True)
                   for d in src.local_dirs]
    mirror_key = f"fashion-mnist/{f.name.removesuffix('.gz')}"
    if src.s3 is not None and src.bucket:
        def from_s3() -> bytes | None:
            with s3_errors(src.endpoint, f"reading s3://{src.bucket}/{mirror_key}"):
                if not object_exists(src.s3, src.bucket, mirror_key):
                    return None
                return src.s3.get_object(Bucket=src.bucket, Key=mirror_key)["Body"].read()
        candidates.append((f"s3://{src.bucket}/{mirror_key}", from_s3, False))

    for where, fetch, gz in candidates:
        raw = verified(fetch(), where, gz=gz)
        if raw is None:
            continue
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.replace(cached)  # atomic: a reader never sees half a file
        if src.s3 is not None and src.bucket and not where.startswith("s3://"):
            with s3_errors(src.endpoint, f"mirroring to s3://{src.bucket}/{mirror_key}"):
                if not object_exists(src.s3, src.bucket, mirror_key):
                    src.s3.put_object(Bucket=src.bucket, Key=mirror_key, Body=raw)
        return raw
    tried = "; ".join(src.tried) or "no source had the file"
    raise DatasetError(f"fashion-mnist file {f.name} not available from any source "
                       f"(official URL, {', '.join(map(str, src.local_dirs))}, S3 mirror): {tried}")


def load_fashion_mnist(cache_dir: Path, sources: FashionMnistSources | None = None) -> RawDataset:
    src = sources or FashionMnistSources()
    cache = cache_dir / "fashion-mnist"
    arrays = [_parse_idx(_fetch_fashion_file(f, cache, src)) for f in FASHION_MNIST_FILES]
    train_x, train_y, test_x, test_y = arrays
    train_file, test_file = FASHION_MNIST_FILES[0], FASHION_MNIST_FILES[2]
    return RawDataset(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64),
                      list(FASHION_MNIST_CLASSES), source="fashion-mnist",
                      train_keys=_row_keys(train_file.sha256, len(train_x)),
                      test_keys=_row_keys(test_file.sha256, len(test_x)),
                      files_digest=digest_lines([f"{f.name}\t{f.sha256}" for f in FASHION_MNIST_FILES]))


def _row_keys(file_sha256: str, count: int) -> np.ndarray:
    """Example keys of an IDX file's rows: the file's content hash and the row number."""
    return np.array([f"{file_sha256[:16]}:{i}" for i in range(count)], dtype=object)


# ----------------------------------------------------------------------------------------- ImageFolder


def _probe(data: bytes) -> str:
    """Why these image bytes are unreadable ("" when readable), from the header and the file's structure,
    without decoding a pixel: an unidentified format, a size over PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, 89 Mpx; PIL itself only warns up to twice that), or a broken or
    truncated file (``verify``: PNG chunk checksums, the structure of the other formats)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                limit = Image.MAX_IMAGE_PIXELS or 0
                if limit and width * height > limit:
                    return (f"{width}x{height} = {width * height / 1e6:.0f} Mpx is over the "
                            f"{limit / 1e6:.0f} Mpx limit on decoded images")
                img.verify()
                return ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"over the decompression-bomb limit: {str(exc).splitlines()[0]}"
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return _undecodable(exc)


def _undecodable(exc: BaseException) -> str:
    return f"undecodable ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _decode(data: bytes, size: int) -> tuple[np.ndarray | None, str]:
    """Probed image bytes -> ((3, size, size) uint8, "") or (None, why its pixels do not decode). The
    probe (the pixel limit included) ran when the tree was read; this decodes and resizes only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy(), ""
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return None, _undecodable(exc)


class DecodedOnRead:
    """An ImageFolder's images, decoded when indexed: ``images[idx]`` (an index array) -> (len(idx), 3, S, S)
    uint8. ``prepare`` indexes only what the class subset and ``--limit`` chose, so a limit of 100 on a
    tree of 100 000 images decodes about 100 (each file was probed, not decoded, when the tree was read).
    A file that passed the probe but whose pixels fail to decode (a JPEG with broken scan data) is refused
    by name, never silently dropped: the splits were already drawn with it."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size
        self._decoded: dict[int, np.ndarray] = {}
        self.decodes = 0  # files decoded so far

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def _one(self, i: int) -> np.ndarray:
        if i not in self._decoded:
            arr, why = _decode(self.paths[i].read_bytes(), self.size)
            self.decodes += 1
            if arr is None:
                raise DatasetError(f"image {self.paths[i]} passed the header check but does not decode: {why}; "
                                   "remove or replace it")
            self._decoded[i] = arr
        return self._decoded[i]

    def __getitem__(self, idx: Any) -> np.ndarray:
        chosen = np.arange(len(self.paths))[idx]
        if chosen.ndim == 0:
            return self._one(int(chosen))
        if len(chosen) == 0:
            return np.empty((0, 3, self.size, self.size), dtype=np.uint8)
        return np.stack([self._one(int(i)) for i in chosen])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self.paths))]
        return out if dtype is None else out.astype(dtype)


def inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel``, refusing a relative name that would land outside ``root``: an absolute path, a ``..``
    segment, in either slash (an S3 key or an archive member name is untrusted text)."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or ".." in parts:
        raise DatasetError(f"refusing {where}: its name {rel[:120]!r} would be written outside the dataset "
                           "cache; allowed: relative names without '..' segments")
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DatasetError(f"refusing {where}: it resolves to {target}, outside the dataset cache {root}")
    return target


def _download_prefix(client: Any, uri: str, dest: Path, endpoint: str | None) -> Path:
    bucket, prefix = split_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    count = 0
    with s3_errors(endpoint, f"listing {uri}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                target = inside(dest, rel, f"s3://{bucket}/{obj['Key']}")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not (target.is_file() and target.stat().st_size == obj["Size"]):
                    client.download_file(bucket, obj["Key"], str(target))
                count += 1
    if count == 0:
        raise DatasetError(f"dataset URI {uri} holds no objects; expected an ImageFolder tree "
                           "(<class>/<image> or train|test/<class>/<image>)")
    return dest


@dataclass
class Tree:
    """One ImageFolder tree, read and probed: its images (decoded when indexed), labels, class names, and
    what was read."""

    images: DecodedOnRead
    labels: np.ndarray
    classes: list[str]
    keys: np.ndarray  # sha256 of each readable image's file
    files: list[str]  # "<relative path>\t<sha256>" of every file read, unreadable ones included
    skipped: int


def _read_tree(root: Path, size: int, class_names: list[str] | None) -> Tree:
    classes = class_names or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"ImageFolder {root} has {len(classes)} class folder(s); need >= 2 "
                           "(layout <class>/<image>)")
    paths, labels, keys, read, skipped = [], [], [], [], 0
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"class folder {name!r} in {root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        unreadable: list[str] = []
        for path in files:
            data = path.read_bytes()
            sha = _sha256(data)
            read.append(f"{path.relative_to(root).as_posix()}\t{sha}")
            why = _probe(data)
            if why:
                skipped += 1
                unreadable.append(f"{path.relative_to(root).as_posix()}: {why}")
                log.warning("skipping unreadable image %s: %s", path, why)
                continue
            paths.append(path)
            labels.append(label)
            keys.append(sha)
        if len(unreadable) == len(files):  # a class with no example left would silently drop out of training
            raise DatasetError(f"class folder {name!r} in {root}: all {len(files)} image(s) are unreadable "
                               f"(first: {unreadable[0]}); refusing to train without that class")
    return Tree(DecodedOnRead(paths, size), np.asarray(labels, dtype=np.int64), classes,
                np.array(keys, dtype=object), read, skipped)


def load_image_folder(uri: str, image_size: int, cache_dir: Path, s3: Any | None = None,
                      endpoint: str | None = None) -> RawDataset:
    """An ImageFolder tree (local directory or s3:// prefix), decoded and resized to ``image_size``."""
    if uri.startswith("s3://"):
        if s3 is None:
            raise DatasetError(f"dataset URI {uri} needs S3, but no S3 endpoint is configured")
        root = _download_prefix(s3, uri, cache_dir / "imagefolder" / hashlib.sha256(uri.encode()).hexdigest()[:16],
                                endpoint)
        touch(root)  # a use: the cache's size cap removes the least recently used mirrors first
    else:
        root = Path(uri.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise DatasetError(f"unknown dataset {uri!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}), "
                               "an existing directory or an s3://bucket/prefix URI")
    split_layout = (root / "train").is_dir()
    train = _read_tree(root / "train" if split_layout else root, image_size, None)
    test = _read_tree(root / "test", image_size, train.classes) if split_layout and (root / "test").is_dir() else None
    files = [f"train/{line}" for line in train.files] if split_layout else list(train.files)
    files += [f"test/{line}" for line in test.files] if test else []
    skipped = train.skipped + (test.skipped if test else 0)
    if skipped > MAX_CORRUPT_FRACTION * len(files):
        raise DatasetError(f"{skipped} of {len(files)} images in {uri} are corrupt (more than "
                           f"{MAX_CORRUPT_FRACTION:.0%}); refusing to train on it")
    return RawDataset(train.images, train.labels, test.images if test else None, test.labels if test else None,
                      train.classes, source=uri, skipped=skipped, train_keys=train.keys,
                      test_keys=test.keys if test else None, files_digest=digest_lines(files))


# ----------------------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class DataSpec:
    """What to train and test on; everything a run needs to rebuild exactly the same splits."""

    dataset: str = "fashion-mnist"
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
    digests: dict[str, str] = field(default_factory=dict)  # per split: sha256 over (example key, class name)

    def split(self, name: str) -> ArraySplit:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_raw(spec: DataSpec, cache_dir: Path, s3: Any | None = None, bucket: str | None = None,
             endpoint: str | None = None) -> RawDataset:
    if spec.dataset == "fashion-mnist":
        return load_fashion_mnist(cache_dir, FashionMnistSources(s3=s3, bucket=bucket, endpoint=endpoint))
    if "://" in spec.dataset and not spec.dataset.startswith(("s3://", "file://")):
        raise DatasetError(f"unsupported dataset URI {spec.dataset!r}; allowed: "
                           f"{', '.join(BUILTIN_DATASETS)}, a local directory, s3://bucket/prefix")
    try:
        return load_image_folder(spec.dataset, spec.image_size, cache_dir, s3, endpoint)
    except S3Error as exc:
        raise DatasetError(str(exc)) from None


def _keys(keys: np.ndarray | None, count: int) -> np.ndarray:
    """A raw dataset's example keys, or row numbers for arrays built without them."""
    return keys if keys is not None and len(keys) == count else np.arange(count).astype(str).astype(object)


def prepare(raw: RawDataset, spec: DataSpec) -> PreparedData:
    """Class subset -> stratified limit -> seeded stratified train/val split -> resize to uint8 tensors."""
    try:
        classes = parse_classes(spec.classes, len(raw.class_names))
    except ValueError as exc:
        raise DatasetError(f"{exc} (dataset {spec.dataset})") from None
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
        digests={"train": digest(pool_keys[train_i], pool_y[train_i]), "val": digest(pool_keys[val_i], pool_y[val_i]),
                 "test": digest(test_keys, test_y)},
    )
