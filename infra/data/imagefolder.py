"""ImageFolder trees (``<class>/<image>`` or ``train|test/<class>/<image>``) from a local directory, an
``s3://bucket/prefix`` (mirrored into the cache) or an extracted archive (``infra.data.web``).

Every file is read, hashed and probed when the tree is read (header, PIL's pixel limit, ``verify``); pixels
are decoded only for the examples ``prepare`` indexes. Unreadable images are named and skipped, a class
whose images are all unreadable is refused, and so is a tree with more than ``MAX_CORRUPT_FRACTION`` of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra.data.cache import touch, writer_temp
from infra.data.spec import DatasetError, RawDataset, Sources, digest_lines, sha256_hex
from infra.storage.s3 import s3_errors, split_uri

log = logging.getLogger(__name__)

MAX_CORRUPT_FRACTION = 0.1
ETAGS_FILE = ".etags.json"  # beside a mirrored tree's class folders: the ETag each file was fetched with
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
    """Mirror ``uri`` into ``dest``: an object is fetched when the mirror has no copy or its ETag (the object's
    checksum, which an edit of the same size changes too) differs from the one recorded when it was fetched,
    and a file whose object is gone is removed. The ETags live in ``dest/.etags.json``."""
    bucket, prefix = split_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    index = dest / ETAGS_FILE
    try:
        known: dict[str, str] = json.loads(index.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    listed: dict[str, str] = {}
    with s3_errors(endpoint, f"listing {uri}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                target = inside(dest, rel, f"s3://{bucket}/{obj['Key']}")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not (target.is_file() and known.get(rel) == obj["ETag"]):
                    client.download_file(bucket, obj["Key"], str(target))
                listed[rel] = obj["ETag"]
    if not listed:
        raise DatasetError(f"dataset URI {uri} holds no objects; expected an ImageFolder tree "
                           "(<class>/<image> or train|test/<class>/<image>)")
    for path in [p for p in dest.rglob("*") if p.is_file() and p != index]:
        if path.relative_to(dest).as_posix() not in listed and not path.name.startswith(f".{ETAGS_FILE}."):
            path.unlink(missing_ok=True)  # removed from the prefix since the last mirror
    tmp = writer_temp(index)
    tmp.write_text(json.dumps(listed))
    os.replace(tmp, index)
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
            sha = sha256_hex(data)
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


def image_folder_root(uri: str, cache_dir: Path, src: Sources) -> Path:
    """The local root of an ImageFolder URI: a directory as it is, an s3:// prefix mirrored into the cache."""
    if uri.startswith("s3://"):
        if src.s3 is None:
            raise DatasetError(f"dataset URI {uri} needs S3, but no S3 endpoint is configured")
        root = _download_prefix(src.s3, uri, cache_dir / "imagefolder" / hashlib.sha256(uri.encode()).hexdigest()[:16],
                                src.endpoint)
        touch(root)  # a use: the cache's size cap removes the least recently used mirrors first
        return root
    root = Path(uri.removeprefix("file://")).expanduser()
    if not root.is_dir():
        raise DatasetError(f"unknown dataset {uri[:200]!r}: not a named dataset (`headbench datasets`), an existing "
                           "directory, an s3://bucket/prefix or an http(s):// archive URL")
    return root


def read_image_folder(root: Path, image_size: int, source: str) -> RawDataset:
    """The ImageFolder tree at ``root``, probed; images decoded and resized to ``image_size`` when indexed."""
    split_layout = (root / "train").is_dir()
    train = _read_tree(root / "train" if split_layout else root, image_size, None)
    test = _read_tree(root / "test", image_size, train.classes) if split_layout and (root / "test").is_dir() else None
    files = [f"train/{line}" for line in train.files] if split_layout else list(train.files)
    files += [f"test/{line}" for line in test.files] if test else []
    skipped = train.skipped + (test.skipped if test else 0)
    if skipped > MAX_CORRUPT_FRACTION * len(files):
        raise DatasetError(f"{skipped} of {len(files)} images in {source} are corrupt (more than "
                           f"{MAX_CORRUPT_FRACTION:.0%}); refusing to train on it")
    return RawDataset(train.images, train.labels, test.images if test else None, test.labels if test else None,
                      train.classes, source=source, skipped=skipped, train_keys=train.keys,
                      test_keys=test.keys if test else None, files_digest=digest_lines(files))


def load_image_folder(uri: str, image_size: int, cache_dir: Path, src: Sources | None = None) -> RawDataset:
    """An ImageFolder tree (local directory or s3:// prefix), decoded and resized to ``image_size``."""
    return read_image_folder(image_folder_root(uri, cache_dir, src or Sources()), image_size, uri)
