"""Named datasets: the registry of standard datasets headbench fetches by name (``--dataset cifar10``).

Each entry carries its class names, channels, native size, split sizes and the files it is made of, with
the upstream URLs and published checksums that torchvision's own dataset classes use
(``torchvision.datasets.MNIST.resources``, ``CIFAR10.url`` / ``tgz_md5``, ``SVHN.split_list``...). A file is
taken, in order, from the local cache, its URLs and the S3 data bucket's mirror (``s3://<data
bucket>/<dataset>/<file>``), verified against its checksum before anything reads it, then cached and
mirrored to S3. ``HEADBENCH_DATASET_MIRROR`` replaces the upstream hosts: the file is fetched from
``<mirror>/<dataset>/<file>``, so an offline site serves its own copy of the same files.

Fashion-MNIST keeps a source of its own, the Debian package ``dataset-fashion-mnist``; its files are
checked by the SHA-256 of their decompressed content, which the official and the Debian files share.

Nothing here unpickles an untrusted byte: CIFAR's Python batches are read from their verified archive by an
unpickler that builds nothing but numpy arrays, lists, dicts and numbers.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, KMNIST, MNIST, SVHN

from infra.data.cache import writer_temp
from infra.data.download import DownloadError, download, file_digest
from infra.data.spec import DatasetError, RawDataset, Sources, digest_lines, parse_idx, row_keys, sha256_hex

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class CatalogueFile:
    name: str  # upstream file name: the last part of its URL, and its name in the mirror, the cache and S3
    md5: str  # the published checksum of that file, as torchvision checks it
    url: str | None = None  # its upstream URL, when not <base>/<name>


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, labels, test images, labels
Reader = Callable[[dict[str, Path]], Arrays]


@dataclass(frozen=True)
class NamedDataset:
    name: str
    classes: tuple[str, ...]
    channels: int  # 1 = grayscale (replicated to 3 channels when training), 3 = RGB
    native_size: int  # side of the square images, pixels
    train_size: int
    test_size: int
    files: tuple[CatalogueFile, ...]
    bases: tuple[str, ...] = ()  # upstream base URLs, tried in order (a file's own ``url`` wins)
    read: Reader | None = None  # verified files by name -> arrays; None: a loader of its own (Fashion-MNIST)
    homepage: str = ""

    def urls(self, file: CatalogueFile, mirror: str | None) -> list[str]:
        """Where ``file`` is downloaded from: the mirror alone when one is set, else upstream."""
        if mirror:
            return [f"{mirror.rstrip('/')}/{self.name}/{file.name}"]
        return [file.url] if file.url else [base + file.name for base in self.bases]

    def source_uri(self, mirror: str | None = None) -> str:
        """The dataset's source as one URI (lineage): the first file's folder."""
        first = self.urls(self.files[0], mirror)
        return first[0].rsplit("/", 1)[0] + "/" if first else self.homepage


# ----------------------------------------------------------------------------------------- readers


def _idx_reader(names: tuple[str, str, str, str]) -> Reader:
    """MNIST-format files (gzip'ed IDX): train images, train labels, test images, test labels."""

    def read(paths: dict[str, Path]) -> Arrays:
        train_x, train_y, test_x, test_y = (parse_idx(gzip.decompress(paths[n].read_bytes())) for n in names)
        return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)

    return read


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and refuses every other global: a pickle
    that names any other callable is refused instead of run."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
        ("numpy", "dtype"), ("_codecs", "encode")})  # _codecs.encode: bytes in a protocol-2 pickle

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _cifar_reader(archive: str, folder: str, train: Sequence[str], test: Sequence[str], label_key: str) -> Reader:
    """CIFAR's Python version: a tar.gz of pickled batches {data: (N, 3072) uint8, labels: [N]}."""

    def batches(tar: tarfile.TarFile, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            member = tar.extractfile(f"{folder}/{name}")
            if member is None:
                raise DatasetError(f"{archive}: member {folder}/{name} is missing or not a file")
            try:
                entry = _ArraysOnly(io.BytesIO(member.read()), encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
                raise DatasetError(f"{archive}: {folder}/{name} is not a CIFAR batch ({exc})") from None
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    def read(paths: dict[str, Path]) -> Arrays:
        try:
            with tarfile.open(paths[archive]) as tar:
                return (*batches(tar, train), *batches(tar, test))  # type: ignore[return-value]
        except (tarfile.TarError, KeyError, OSError) as exc:
            raise DatasetError(f"{archive} does not hold CIFAR's batches: {exc}") from None

    return read


def _svhn_reader(train: str, test: str) -> Reader:
    """SVHN's cropped digits: MATLAB files with X (32, 32, 3, N) and y (N, 1), digit 0 labelled 10."""

    def split(path: Path) -> tuple[np.ndarray, np.ndarray]:
        from scipy.io import loadmat

        try:
            mat = loadmat(path)
        except (ValueError, OSError, TypeError) as exc:
            raise DatasetError(f"{path.name} is not an SVHN MATLAB file: {exc}") from None
        labels = mat["y"].astype(np.int64).reshape(-1)
        labels[labels == 10] = 0  # as torchvision's SVHN does: class i is digit i
        return np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))), labels  # (N, 3, H, W)

    def read(paths: dict[str, Path]) -> Arrays:
        return (*split(paths[train]), *split(paths[test]))  # type: ignore[return-value]

    return read


def _mnist_family(name: str, source: type[MNIST], classes: Sequence[str], homepage: str) -> NamedDataset:
    files = tuple(CatalogueFile(f, md5) for f, md5 in source.resources)
    return NamedDataset(name, tuple(classes), 1, 28, 60_000, 10_000, files, tuple(source.mirrors),
                        _idx_reader(tuple(f.name for f in files)), homepage)  # type: ignore[arg-type]


def _cifar(name: str, source: type[CIFAR10], classes: Sequence[str], label_key: str) -> NamedDataset:
    return NamedDataset(name, tuple(classes), 3, 32, 50_000, 10_000,
                        (CatalogueFile(source.filename, source.tgz_md5, source.url),), (),
                        _cifar_reader(source.filename, source.base_folder, [n for n, _ in source.train_list],
                                      [n for n, _ in source.test_list], label_key),
                        "https://www.cs.toronto.edu/~kriz/cifar.html")


FASHION_MNIST_CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                          "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")


def _svhn() -> NamedDataset:
    (train_url, train_file, train_md5), (test_url, test_file, test_md5) = (SVHN.split_list[s]
                                                                          for s in ("train", "test"))
    return NamedDataset("svhn", tuple(str(d) for d in range(10)), 3, 32, 73_257, 26_032,
                        (CatalogueFile(train_file, train_md5, train_url), CatalogueFile(test_file, test_md5, test_url)),
                        (), _svhn_reader(train_file, test_file), "http://ufldl.stanford.edu/housenumbers/")


# Fashion-MNIST: published MD5s of the official .gz files, and SHA-256s of their decompressed content (the
# Debian package's files are recompressed: only the content matches)
FASHION_MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST = NamedDataset(
    "fashion-mnist", FASHION_MNIST_CLASSES, 1, 28, 60_000, 10_000,
    tuple(CatalogueFile(f, md5) for f, md5 in (
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"))),
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), None,
    "https://github.com/zalandoresearch/fashion-mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

CATALOGUE: dict[str, NamedDataset] = {}


def register(entry: NamedDataset) -> NamedDataset:
    """Add a named dataset; names are unique."""
    if entry.name in CATALOGUE:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    CATALOGUE[entry.name] = entry
    return entry


register(FASHION_MNIST)
register(_mnist_family("mnist", MNIST, [c.split(" - ")[0] for c in MNIST.classes], "http://yann.lecun.com/exdb/mnist/"))
register(_mnist_family("kmnist", KMNIST, KMNIST.classes, "https://github.com/rois-codh/kmnist"))
register(_cifar("cifar10", CIFAR10, CIFAR10_CLASSES, "labels"))
register(_cifar("cifar100", CIFAR100, CIFAR100_CLASSES, "fine_labels"))
register(_svhn())


def named(name: str) -> NamedDataset | None:
    return CATALOGUE.get(name)


# ----------------------------------------------------------------------------------------- fetching


def _mirror_key(entry: NamedDataset, file_name: str) -> str:
    return f"{entry.name}/{file_name}"


def _from_s3(entry: NamedDataset, f: CatalogueFile, dest: Path, src: Sources) -> bool:
    from infra.storage.s3 import object_exists, s3_errors

    key = _mirror_key(entry, f.name)
    with s3_errors(src.endpoint, f"reading s3://{src.bucket}/{key}"):
        if not object_exists(src.s3, src.bucket, key):
            return False
        tmp = writer_temp(dest)
        src.s3.download_file(src.bucket, key, str(tmp))
    if file_digest(tmp, "md5") != f.md5:
        tmp.unlink(missing_ok=True)
        src.tried.append(f"s3://{src.bucket}/{key}: checksum mismatch")
        return False
    tmp.replace(dest)
    return True


def fetch_file(entry: NamedDataset, f: CatalogueFile, cache: Path, src: Sources) -> Path:
    """The verified file in the cache: cached, else from its URLs, else from the S3 mirror (then mirrored)."""
    dest = cache / f.name
    if dest.is_file() and file_digest(dest, "md5") == f.md5:
        return dest
    from_url = False
    for url in entry.urls(f, src.mirror) if src.download else []:
        try:
            download(url, dest, md5=f.md5, limit=src.total_limit)
            from_url = True
            break
        except DownloadError as exc:
            src.tried.append(str(exc))
    if not from_url and not (src.s3 is not None and src.bucket and _from_s3(entry, f, dest, src)):
        raise DatasetError(f"{entry.name}: file {f.name} not available from any source: "
                           f"{'; '.join(src.tried) or 'no source'}")
    if from_url and src.s3 is not None and src.bucket:
        from infra.storage.s3 import object_exists, s3_errors

        key = _mirror_key(entry, f.name)
        with s3_errors(src.endpoint, f"mirroring to s3://{src.bucket}/{key}"):
            if not object_exists(src.s3, src.bucket, key):
                src.s3.upload_file(str(dest), src.bucket, key)
    return dest


def load_named(entry: NamedDataset, cache_dir: Path, sources: Sources | None = None) -> RawDataset:
    """Every file of ``entry`` fetched and verified, then read into arrays."""
    src = sources or Sources()
    if entry.read is None:
        return load_fashion_mnist(cache_dir, src)
    cache = cache_dir / entry.name
    paths = {f.name: fetch_file(entry, f, cache, src) for f in entry.files}
    train_x, train_y, test_x, test_y = entry.read(paths)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DatasetError(f"{entry.name}: {len(train_x)} training images but {len(train_y)} labels, or "
                           f"{len(test_x)} test images but {len(test_y)} labels")
    for labels in (train_y, test_y):
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(entry.classes):
            raise DatasetError(f"{entry.name}: labels outside 0-{len(entry.classes) - 1}")
    files_digest = digest_lines([f"{f.name}\t{f.md5}" for f in entry.files])
    return RawDataset(train_x, train_y, test_x, test_y, list(entry.classes), source=entry.name,
                      train_keys=row_keys(f"{files_digest[:12]}:train", len(train_x)),
                      test_keys=row_keys(f"{files_digest[:12]}:test", len(test_x)), files_digest=files_digest)


# ----------------------------------------------------------------------------------------- Fashion-MNIST


def _fetch_fashion_file(f: CatalogueFile, cache: Path, src: Sources) -> bytes:
    """Decompressed, verified content of one Fashion-MNIST file; cached in ``cache`` and mirrored to S3."""
    local_dirs = (DEBIAN_FASHION_MNIST,) if src.local_dirs is None else tuple(src.local_dirs)
    content_sha = FASHION_MNIST_CONTENT_SHA256[f.name]
    cached = cache / f.name.removesuffix(".gz")
    if cached.is_file():
        data = cached.read_bytes()
        if sha256_hex(data) == content_sha:
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
        if sha256_hex(raw) != content_sha:
            src.tried.append(f"{where}: checksum mismatch (sha256 {sha256_hex(raw)[:12]}... != {content_sha[:12]}...)")
            return None
        return raw

    def from_url(url: str) -> bytes | None:
        scratch = cache / "download" / f.name
        try:
            download(url, scratch, limit=src.total_limit)
        except DownloadError as exc:
            src.tried.append(str(exc))
            return None
        data = scratch.read_bytes()
        scratch.unlink(missing_ok=True)
        return data

    candidates: list[tuple[str, Callable[[], bytes | None], bool]] = []
    if src.download:
        candidates += [(url, lambda u=url: from_url(u), True) for url in FASHION_MNIST.urls(f, src.mirror)]
    candidates += [(str(d / f.name), lambda p=d / f.name: p.read_bytes() if p.is_file() else None, True)
                   for d in local_dirs]
    from infra.storage.s3 import object_exists, s3_errors

    mirror_key = _mirror_key(FASHION_MNIST, f.name.removesuffix(".gz"))
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
        tmp = writer_temp(cached)
        tmp.write_bytes(raw)
        tmp.replace(cached)  # atomic: a reader never sees half a file
        if src.s3 is not None and src.bucket and not where.startswith("s3://"):
            with s3_errors(src.endpoint, f"mirroring to s3://{src.bucket}/{mirror_key}"):
                if not object_exists(src.s3, src.bucket, mirror_key):
                    src.s3.put_object(Bucket=src.bucket, Key=mirror_key, Body=raw)
        return raw
    tried = "; ".join(src.tried) or "no source had the file"
    raise DatasetError(f"fashion-mnist file {f.name} not available from any source "
                       f"(official URL, {', '.join(map(str, local_dirs))}, S3 mirror): {tried}")


def load_fashion_mnist(cache_dir: Path, sources: Sources | None = None) -> RawDataset:
    src = sources or Sources()
    cache = cache_dir / FASHION_MNIST.name
    arrays = [parse_idx(_fetch_fashion_file(f, cache, src)) for f in FASHION_MNIST.files]
    train_x, train_y, test_x, test_y = arrays
    train_sha = FASHION_MNIST_CONTENT_SHA256[FASHION_MNIST.files[0].name]
    test_sha = FASHION_MNIST_CONTENT_SHA256[FASHION_MNIST.files[2].name]
    return RawDataset(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64),
                      list(FASHION_MNIST_CLASSES), source=FASHION_MNIST.name,
                      train_keys=row_keys(train_sha[:16], len(train_x)),
                      test_keys=row_keys(test_sha[:16], len(test_x)),
                      files_digest=digest_lines([f"{f.name}\t{FASHION_MNIST_CONTENT_SHA256[f.name]}"
                                                 for f in FASHION_MNIST.files]))
