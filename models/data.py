"""Pure array/tensor data pieces: class subsets, stratified limits and splits, resizing, normalisation.

Images travel as pre-resized ``uint8`` tensors ``(N, C, S, S)`` (C = 1 for grayscale, 3 for RGB): four
times smaller than float32 and decoded once. A batch is turned into normalised float ``(N, 3, S, S)`` on
the training device by ``normalize_batch``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ArraySplit:
    """One split: images uint8 (N, C, S, S) and labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


MAX_CLASS_INDEX = 10**6 - 1  # far above any real label set; keeps a typo like 0-100000000000 from being expanded


def clip(text: str, width: int = 60) -> str:
    """User text echoed in an error message, cut to ``width`` characters so the message stays one short line."""
    return text if len(text) <= width else text[:width - 3] + "..."


def parse_class_ranges(spec: str) -> list[tuple[int, int]]:
    """``"0-2,5"`` -> [(0, 2), (5, 5)]: syntax only, nothing expanded (a range's bounds may be huge)."""
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        lo, dash, hi = (t.strip() for t in part.strip().partition("-"))
        # isdecimal() and a length cap: int() of a 5000-digit string raises, and nothing needs > 7 digits
        if not (lo.isdecimal() and len(lo) <= 12) or (dash and not (hi.isdecimal() and len(hi) <= 12)):
            raise ValueError(f"bad class list {clip(spec)!r}: use indices like '0-4' or '0,2,7'")
        start, stop = int(lo), int(hi) if dash else int(lo)
        if stop < start:
            raise ValueError(f"bad class range {clip(part.strip())!r} in {clip(spec)!r}: start > end")
        if stop > MAX_CLASS_INDEX:
            raise ValueError(f"class index {stop} in {clip(spec)!r} is too large; allowed: 0-{MAX_CLASS_INDEX}")
        ranges.append((start, stop))
    return ranges


def parse_classes(spec: str | Sequence[int] | None, num_classes: int) -> list[int]:
    """``"0-4"``, ``"0,2,7"``, ``"0-2,5"`` or None (all) -> sorted unique class indices, range-checked.

    Bounds are checked on the ranges before any is expanded, so the cost is bounded by ``num_classes``."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return list(range(num_classes))
    ranges = parse_class_ranges(spec) if isinstance(spec, str) else [(int(c), int(c)) for c in spec]
    outside = [(max(a, num_classes), b) for a, b in ranges if b >= num_classes] + [(a, min(b, -1))
                                                                                    for a, b in ranges if a < 0]
    if outside:
        shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in sorted(set(outside)))
        raise ValueError(f"classes {clip(shown)} out of range for a dataset with {num_classes} classes; "
                         f"allowed: 0-{num_classes - 1}")
    classes = sorted({c for a, b in ranges for c in range(a, b + 1)})
    if len(classes) < 2:
        shown_spec = clip(spec) if isinstance(spec, str) else str(classes)
        raise ValueError(f"class list {shown_spec!r} selects {len(classes)} class; a classifier needs >= 2")
    return classes


def select_classes(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of samples in ``classes`` and their labels re-indexed to 0..k-1 (in ``classes`` order)."""
    remap = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    idx = np.flatnonzero(np.isin(labels, classes))
    return idx, remap[labels[idx]]


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with (as near as possible) the class proportions of ``labels``, deterministic by seed."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # hand out the rounding remainder to the largest fractional parts
    remainder = n - quota.sum()
    frac = counts / counts.sum() * n - quota
    quota[np.argsort(-frac)[:remainder]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train, val) index split; every class keeps >= 1 training sample."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(round(len(idx) * val_fraction), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def resize_uint8(images: np.ndarray, size: int, batch: int = 1024) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) or (N, C, H, W) uint8 -> (N, C, size, size) uint8, antialiased bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous().numpy()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + batch] = resized.round().clamp_(0, 255).to(torch.uint8)
    return out.numpy()


def normalize_batch(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, C, S, S), C in {1, 3} -> float (N, 3, S, S) with ImageNet normalisation.

    Grayscale is replicated to three channels here (expand, no copy) so pretrained RGB stems apply.
    """
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ArrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Map-style dataset over an ArraySplit; items stay uint8 until ``normalize_batch``."""

    def __init__(self, split: ArraySplit) -> None:
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only views (zero copy); nothing here writes to them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.images = torch.from_numpy(np.ascontiguousarray(split.images))
        self.labels = torch.from_numpy(split.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


# --------------------------------------------------------------------------------------------- loaders


MIN_BATCH_PER_WORKER = 2  # BatchNorm in train mode needs more than one value per channel


def check_batch_split(batch_size: int, world: int, train_size: int | None = None) -> None:
    """Refuse a global batch (or a training split) that leaves some process a training batch of one sample.

    Each of ``world`` processes takes ``batch_size // world``; ``epoch_loader`` drops the last partial batch
    whenever a process has a full one, otherwise the process's only batch is its whole sampler share,
    ``ceil(train_size / world)``. BatchNorm raises on a batch of one, deep inside the worker."""
    per = batch_size // world
    if per < MIN_BATCH_PER_WORKER:
        raise ValueError(f"batch_size {batch_size} over {world} workers leaves {per} sample(s) per worker; "
                         f"allowed: batch_size >= {MIN_BATCH_PER_WORKER * world} (or fewer workers)")
    if train_size is not None and -(-train_size // world) < MIN_BATCH_PER_WORKER:
        raise ValueError(f"a training split of {train_size} sample(s) over {world} workers leaves each worker "
                         f"fewer than {MIN_BATCH_PER_WORKER}; allowed: workers <= {max(1, train_size // 2)} or a "
                         "larger --limit")


def epoch_loader(dataset: Dataset[Any], batch_size: int, *, rank: int, world: int, seed: int, shuffle: bool,
                 pin_memory: bool = False) -> DataLoader[Any]:
    """This rank's loader: a seeded ``DistributedSampler`` (also for one process, so a seed means the same
    order everywhere); ``set_epoch`` before each epoch gives each epoch its own order. Training drops the
    ragged last batch (BatchNorm cannot normalise a batch of one) unless a rank's share is under one batch."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    drop_last = shuffle and len(dataset) // world >= batch_size  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, pin_memory=pin_memory)


def set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
