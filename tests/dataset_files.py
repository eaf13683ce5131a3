"""Small datasets in the real on-disk formats of the named datasets, made by the tests (nothing downloaded):
MNIST's gzip'ed IDX files, CIFAR's tar.gz of pickled batches, SVHN's MATLAB files, and ImageFolder archives.
Every image of class c is filled with a value that depends on c, so a model (or a test) can tell them apart."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - the datasets' published checksum kind


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = (labels.astype(np.int64) * 23 + 20).reshape(-1, *([1] * len(shape)))
    return np.clip(base + rng.integers(0, 12, size=(len(labels), *shape)), 0, 255).astype(np.uint8)


def _labels(count: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(count) % classes).astype(np.uint8)


def _idx(array: np.ndarray) -> bytes:
    """IDX: magic 0x00 0x00 0x08 (uint8) ndim, big-endian dims, then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_files(folder: Path, train: int = 200, test: int = 60) -> dict[str, Path]:
    """The four MNIST files (train/t10k images/labels, gzip'ed IDX), 28x28 grayscale, 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, count, seed in (("train", train, 1), ("t10k", test, 2)):
        labels = _labels(count, 10, seed)
        for kind, array in (("images-idx3", _images(labels, (28, 28), seed)), ("labels-idx1", labels)):
            path = folder / f"{prefix}-{kind}-ubyte.gz"
            path.write_bytes(gzip.compress(_idx(array), mtime=0))
            out[path.name] = path
    return out


def cifar10_archive(path: Path, per_batch: int = 40, test: int = 60) -> Path:
    """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, each batch a
    pickled dict {"data": (N, 3072) uint8 rows of R, G, B planes, "labels": [N], ...} as the real one."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: object) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        batches = [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", test)]
        for i, (name, count) in enumerate(batches):
            labels = _labels(count, 10, 10 + i)
            images = _images(labels, (3, 32, 32), 10 + i).reshape(count, 3072)
            add(name, {"batch_label": name, "labels": labels.tolist(), "data": images,
                       "filenames": [f"{name}_{j}.png" for j in range(count)]})
        add("batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return path


def svhn_files(folder: Path, train: int = 120, test: int = 60) -> dict[str, Path]:
    """train_32x32.mat and test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with digit 0 labelled 10."""
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, count, seed in (("train_32x32.mat", train, 3), ("test_32x32.mat", test, 4)):
        labels = _labels(count, 10, seed)
        images = _images(labels, (32, 32, 3), seed)  # (N, H, W, C)
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        savemat(folder / name, {"X": np.transpose(images, (1, 2, 3, 0)), "y": y})
        out[name] = folder / name
    return out


def image_folder_archive(path: Path, classes: dict[str, int], size: int = 24, wrapper: str = "flowers",
                         extra: list[tuple[str, bytes]] = ()) -> Path:
    """A tar.gz (or .zip by suffix) of ``<wrapper>/<class>/<i>.png``, plus ``extra`` raw members."""
    import zipfile

    members: list[tuple[str, bytes]] = []
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            buf = io.BytesIO()
            pixels = _images(np.array([c]), (size, size, 3), seed=100 * c + i)[0]
            Image.fromarray(pixels).save(buf, format="PNG")
            members.append((f"{wrapper}/{name}/{i}.png", buf.getvalue()))
    members += list(extra)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png(value: int) -> bytes:
    """A 24x24 RGB PNG of one grey value (a class shows in its brightness)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
