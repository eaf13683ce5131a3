"""Data: class subsets, stratified limits and splits, checksums, ImageFolder decoding and skipping."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infra.data.catalogue import DEBIAN_FASHION_MNIST as DEBIAN_DIR
from infra.data.catalogue import load_fashion_mnist
from infra.data.imagefolder import load_image_folder
from infra.data.spec import DatasetError, DataSpec, RawDataset, Sources, prepare
from models.data import (
    IMAGENET_MEAN,
    normalize_batch,
    parse_classes,
    resize_uint8,
    select_classes,
    stratified_split,
    stratified_subset,
)


def test_parse_classes() -> None:
    assert parse_classes("0-4", 10) == [0, 1, 2, 3, 4]
    assert parse_classes("7,2,0", 10) == [0, 2, 7]
    assert parse_classes("0-2,5", 10) == [0, 1, 2, 5]
    assert parse_classes(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"classes 10-11 out of range .* allowed: 0-9"):
        parse_classes("8-11", 10)
    with pytest.raises(ValueError, match="bad class list 'a-b'"):
        parse_classes("a-b", 10)
    with pytest.raises(ValueError, match="needs >= 2"):
        parse_classes("3", 10)


def test_select_classes_reindexes() -> None:
    labels = np.array([5, 6, 7, 5, 9, 6])
    idx, y = select_classes(labels, [5, 6])
    assert idx.tolist() == [0, 1, 3, 5] and y.tolist() == [0, 1, 0, 1]


def test_stratified_subset_keeps_proportions_and_is_seeded() -> None:
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    picked = stratified_subset(labels, 100, seed=3)
    assert len(picked) == 100
    assert np.bincount(labels[picked]).tolist() == [40, 30, 20, 10]
    assert np.array_equal(picked, stratified_subset(labels, 100, seed=3))
    assert not np.array_equal(picked, stratified_subset(labels, 100, seed=4))


def test_stratified_split_is_disjoint_complete_and_seeded() -> None:
    labels = np.repeat(np.arange(3), 50)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 150
    assert np.bincount(labels[val]).tolist() == [10, 10, 10]
    again_train, _ = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again_train)
    other_train, _ = stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(train, other_train)


def test_resize_and_normalize_shapes() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = resize_uint8(gray, 32)
    assert out.shape == (5, 1, 32, 32) and out.dtype == np.uint8
    rgb_nhwc = np.zeros((2, 40, 40, 3), dtype=np.uint8)
    assert resize_uint8(rgb_nhwc, 32).shape == (2, 3, 32, 32)
    x = normalize_batch(torch.from_numpy(out))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    zeros = normalize_batch(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    assert zeros[0, 0, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[0] / 0.229, rel=1e-5)


needs_debian = pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed "
                                  "(make test installs it)")


@needs_debian
def test_fashion_mnist_from_debian_files_is_verified_and_cached(tmp_path: Path) -> None:
    raw = load_fashion_mnist(tmp_path, Sources(download=False, local_dirs=(DEBIAN_DIR,)))
    assert raw.train_images.shape == (60000, 28, 28) and raw.test_images.shape == (10000, 28, 28)
    assert np.bincount(raw.train_labels).tolist() == [6000] * 10
    cached = sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir())
    assert cached == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                      "train-labels-idx1-ubyte"]
    # second load comes from the cache alone: no source at all is needed
    again = load_fashion_mnist(tmp_path, Sources(download=False, local_dirs=()))
    assert np.array_equal(again.test_labels, raw.test_labels)


@needs_debian
def test_fashion_mnist_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "mirror"
    shutil.copytree(DEBIAN_DIR, source)
    labels = source / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[100] ^= 0xFF  # one flipped label byte
    labels.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz not available .* checksum mismatch"):
        load_fashion_mnist(tmp_path / "cache", Sources(download=False, local_dirs=(source,)))
    truncated = source / "train-labels-idx1-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DatasetError, match="not a valid gzip file"):
        load_fashion_mnist(tmp_path / "cache2", Sources(download=False, local_dirs=(source,)))


def _write_tree(root: Path, counts: dict[str, int], corrupt: int = 0) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    for i in range(corrupt):
        (root / next(iter(counts)) / f"broken{i}.png").write_bytes(b"not a png at all")


def test_image_folder_decodes_resizes_and_skips_corrupt(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"cat": 12, "dog": 10}, corrupt=1)
    raw = load_image_folder(str(tmp_path), 32, tmp_path / "cache")
    assert raw.class_names == ["cat", "dog"] and raw.skipped == 1
    assert raw.train_images.shape == (22, 3, 32, 32) and raw.test_images is None
    data = prepare(raw, DataSpec(dataset=str(tmp_path), image_size=32, seed=0, val_fraction=0.2,
                                 test_fraction=0.25))
    assert len(data.train) + len(data.val) + len(data.test) == 22
    assert set(data.test.labels.tolist()) == {0, 1}


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_tree(tmp_path / "a", {"cat": 3})
    (tmp_path / "a" / "dog").mkdir()
    with pytest.raises(DatasetError, match="class folder 'dog' .* has no images"):
        load_image_folder(str(tmp_path / "a"), 32, tmp_path / "cache")
    _write_tree(tmp_path / "b", {"cat": 2, "dog": 2}, corrupt=2)
    with pytest.raises(DatasetError, match="2 of 6 images .* are corrupt"):
        load_image_folder(str(tmp_path / "b"), 32, tmp_path / "cache")
    with pytest.raises(DatasetError, match="unknown dataset .*not a named dataset"):
        load_image_folder(str(tmp_path / "missing"), 32, tmp_path / "cache")


def test_prepare_class_subset_limit_and_names() -> None:
    rng = np.random.default_rng(0)
    raw = RawDataset(rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 100),
                     rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 20),
                     [f"c{i}" for i in range(10)], source="synthetic")
    data = prepare(raw, DataSpec(classes="5-9", limit=200, test_limit=50, image_size=32, seed=1))
    assert data.class_names == ["c5", "c6", "c7", "c8", "c9"] and data.class_indices == [5, 6, 7, 8, 9]
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 50
    assert set(np.unique(data.train.labels)) == {0, 1, 2, 3, 4}
    assert data.train.images.shape[1:] == (1, 32, 32)
    with pytest.raises(DatasetError, match="out of range"):
        prepare(raw, DataSpec(classes="8-12"))


def test_digests_name_the_files_read_and_the_examples_of_each_split(tmp_path: Path) -> None:
    """files_digest covers every file read (the corrupt one too); a split digest depends on which examples
    and labels it holds, not on the image size; one more image changes the files digest."""
    _write_tree(tmp_path / "d", {"cat": 12, "dog": 10}, corrupt=1)
    spec = DataSpec(dataset=str(tmp_path / "d"), image_size=32, seed=0, val_fraction=0.2, test_fraction=0.25)
    first = prepare(load_image_folder(spec.dataset, 32, tmp_path / "cache"), spec)
    again = prepare(load_image_folder(spec.dataset, 40, tmp_path / "cache"), DataSpec(**{**spec.__dict__,
                                                                                        "image_size": 40}))
    assert first.files_digest == again.files_digest and first.digests == again.digests
    assert len({first.digests["train"], first.digests["val"], first.digests["test"]}) == 3
    other_seed = prepare(load_image_folder(spec.dataset, 32, tmp_path / "cache"), DataSpec(**{**spec.__dict__,
                                                                                              "seed": 1}))
    assert other_seed.files_digest == first.files_digest and other_seed.digests["test"] != first.digests["test"]
    (tmp_path / "d" / "cat" / "broken0.png").write_bytes(b"still not a png")  # an unreadable file changed
    assert load_image_folder(spec.dataset, 32, tmp_path / "cache").files_digest != first.files_digest
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(tmp_path / "d" / "dog" / "new.png")
    grown = load_image_folder(spec.dataset, 32, tmp_path / "cache")
    assert len(grown.train_labels) == 23 and grown.files_digest != first.files_digest


def test_an_image_folders_limit_applies_before_decoding(tmp_path: Path) -> None:
    """--limit 20 (and --test-limit 10) on 300 images decode those 30, not all 300, and pick the same
    examples as decoding everything first would."""
    _write_tree(tmp_path / "t", {"cat": 100, "dog": 100, "eel": 100})
    raw = load_image_folder(str(tmp_path / "t"), 32, tmp_path / "cache")
    assert raw.train_images.decodes == 0  # the tree was read and probed, not decoded
    spec = DataSpec(dataset=str(tmp_path / "t"), classes="0-1", limit=20, test_limit=10, image_size=32, seed=4)
    data = prepare(raw, spec)
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 10
    assert raw.train_images.decodes == 30
    eager = RawDataset(np.asarray(raw.train_images), raw.train_labels, None, None, raw.class_names, source="eager",
                       train_keys=raw.train_keys)
    same = prepare(eager, spec)
    assert data.digests == same.digests
    for split in ("train", "val", "test"):
        assert np.array_equal(data.split(split).images, same.split(split).images)


def test_an_image_that_probes_clean_but_does_not_decode_is_named(tmp_path: Path) -> None:
    _write_tree(tmp_path / "t", {"cat": 4, "dog": 4})
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "t" / "dog" / "bad.jpg")
    data = (tmp_path / "t" / "dog" / "bad.jpg").read_bytes()
    start = data.index(b"\xff\xda")  # the scan: JPEG's verify() stops at its header
    (tmp_path / "t" / "dog" / "bad.jpg").write_bytes(data[:start + 20])
    raw = load_image_folder(str(tmp_path / "t"), 32, tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"image .*bad\.jpg passed the header check but does not decode"):
        prepare(raw, DataSpec(dataset=str(tmp_path / "t"), image_size=32, test_fraction=0.25))
