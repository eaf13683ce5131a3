"""Named datasets through a mirror (a real loopback HTTP server serving files in the datasets' real on-disk
formats, made by tests/dataset_files.py): verified, read into arrays, cached; and the formats are real, in
that torchvision's own dataset classes read the same files. The checksums of these small files are not the
published ones, so each test uses its catalogue entry with the files' own checksums (dataclasses.replace)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision

from infra.data.catalogue import CATALOGUE, CatalogueFile, NamedDataset, load_named
from infra.data.spec import DatasetError, DataSpec, Sources, prepare
from tests.dataset_files import cifar10_archive, md5, mnist_files, svhn_files
from tests.http_server import serving


def _entry(name: str, files: dict[str, Path]) -> NamedDataset:
    """The catalogue entry of ``name`` with the checksums of the test's own files."""
    entry = CATALOGUE[name]
    return dataclasses.replace(entry, files=tuple(CatalogueFile(f.name, md5(files[f.name]), f.url)
                                                  for f in entry.files))


@pytest.fixture
def mirror(tmp_path: Path):
    root = tmp_path / "mirror"
    files = {**mnist_files(root / "mnist"), **svhn_files(root / "svhn")}
    files["cifar-10-python.tar.gz"] = cifar10_archive(root / "cifar10" / "cifar-10-python.tar.gz")
    with serving(root) as (base, state):
        yield base, state, files


def test_the_registry_lists_the_standard_datasets_with_their_facts() -> None:
    assert {"fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "svhn"} <= set(CATALOGUE)
    assert (len(CATALOGUE["cifar100"].classes), CATALOGUE["cifar100"].channels) == (100, 3)
    assert CATALOGUE["mnist"].files[0].md5 == dict(torchvision.datasets.MNIST.resources)["train-images-idx3-ubyte.gz"]
    assert CATALOGUE["cifar10"].files[0].url == torchvision.datasets.CIFAR10.url  # torchvision's own URLs
    assert CATALOGUE["svhn"].urls(CATALOGUE["svhn"].files[0], "http://m/") == ["http://m/svhn/train_32x32.mat"]


@pytest.mark.parametrize(("name", "shape", "train", "test"), [
    ("mnist", (28, 28), 200, 60), ("cifar10", (3, 32, 32), 200, 60), ("svhn", (3, 32, 32), 120, 60)])
def test_a_named_dataset_comes_through_the_mirror_verified_and_cached(mirror, tmp_path: Path, name: str,
                                                                      shape: tuple[int, ...], train: int,
                                                                      test: int) -> None:
    base, state, files = mirror
    entry = _entry(name, files)
    raw = load_named(entry, tmp_path / "cache", Sources(mirror=base))
    assert raw.train_images.shape == (train, *shape) and raw.test_images.shape == (test, *shape)
    assert raw.train_images.dtype == np.uint8 and set(np.unique(raw.train_labels)) == set(range(10))
    # class c was drawn at 23c + 20..31: the labels line up with the pixels
    means = raw.train_images.reshape(train, -1).mean(axis=1)
    assert np.all(np.abs(means - (23 * raw.train_labels + 25.5)) < 3)
    assert raw.class_names == list(entry.classes) and len(set(raw.train_keys)) == train
    fetched = len(state.requests)
    assert fetched == len(entry.files) and all(p.startswith(f"/{name}/") for p, _, _ in state.requests)
    again = load_named(entry, tmp_path / "cache", Sources(mirror=base))  # from the cache: no request
    assert len(state.requests) == fetched and again.files_digest == raw.files_digest
    data = prepare(again, DataSpec(dataset=name, classes="0-2", limit=60, image_size=32))
    assert data.train.images.shape[1:] == (shape[0] if len(shape) == 3 else 1, 32, 32)


def test_the_test_files_are_in_the_real_formats_torchvision_reads(mirror, tmp_path: Path) -> None:
    _, _, files = mirror
    raw = load_named(_entry("cifar10", files), tmp_path / "cache", Sources(mirror=mirror[0]))
    with tarfile.open(files["cifar-10-python.tar.gz"]) as tar:
        tar.extractall(tmp_path / "tv", filter="data")
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    lists = {"train_list": [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)],
             "test_list": [["test_batch", md5(folder / "test_batch")]],
             "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5(folder / "batches.meta")}}
    cifar = type("Cifar", (torchvision.datasets.CIFAR10,), lists)(str(tmp_path / "tv"), train=True)
    assert np.array_equal(cifar.data.transpose(0, 3, 1, 2), raw.train_images) and cifar.targets == \
        raw.train_labels.tolist() and cifar.classes == list(CATALOGUE["cifar10"].classes)
    mnist_raw = tmp_path / "tv" / "MNIST" / "raw"
    mnist_raw.mkdir(parents=True)
    import gzip
    for name, path in files.items():
        if name.endswith("ubyte.gz"):
            (mnist_raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    mnist = torchvision.datasets.MNIST(str(tmp_path / "tv"), train=False)
    assert mnist.data.shape == (60, 28, 28)
    svhn = type("Svhn", (torchvision.datasets.SVHN,), {"split_list": {"test": ["", "test_32x32.mat", md5(
        files["test_32x32.mat"])]}})(str(files["test_32x32.mat"].parent), split="test")
    assert svhn.data.shape == (60, 3, 32, 32) and set(svhn.labels) == set(range(10))


def test_a_file_that_fails_its_checksum_is_refused_and_not_cached(mirror, tmp_path: Path) -> None:
    base, _, files = mirror
    entry = dataclasses.replace(_entry("mnist", files), files=tuple(
        dataclasses.replace(f, md5="0" * 32) if f.name.startswith("t10k-labels") else f
        for f in _entry("mnist", files).files))
    with pytest.raises(DatasetError) as err:
        load_named(entry, tmp_path / "cache", Sources(mirror=base))
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "0" * 32 in message and "\n" not in message
    assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # what a hostile pickle does: call something when loaded
            return (Path.touch, (tmp_path / "pwned",))

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = pickle.dumps({"data": Payload(), "labels": [0]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry = _entry("cifar10", {"cifar-10-python.tar.gz": archive})
    (tmp_path / "cache" / "cifar10").mkdir(parents=True)
    (tmp_path / "cache" / "cifar10" / archive.name).write_bytes(archive.read_bytes())
    with pytest.raises(DatasetError, match="is not a CIFAR batch .*not allowed"):
        load_named(entry, tmp_path / "cache", Sources(download=False))
    assert not (tmp_path / "pwned").exists()


def test_no_source_is_one_line_naming_what_was_tried(tmp_path: Path) -> None:
    from infra.processes.supervise import free_port

    entry = CATALOGUE["kmnist"]
    with pytest.raises(DatasetError) as err:
        load_named(entry, tmp_path / "cache", Sources(mirror=f"http://127.0.0.1:{free_port()}"))
    assert "kmnist: file train-images-idx3-ubyte.gz not available" in str(err.value)
    assert "unreachable" in str(err.value) and "\n" not in str(err.value)
