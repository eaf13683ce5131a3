"""Training-time augmentation of whole batches on the device, and the input functions that turn a loader's batch
into what the model takes: uint8 images -> normalised float (-> augmented), or cached features as they are."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from models.data import normalize_batch


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Flip a random half of the batch left-right: (N, C, H, W) -> (N, C, H, W)."""
    flip = torch.rand(images.shape[0], device="cpu").lt(0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_resized_crop_flip(images: torch.Tensor, scale: tuple[float, float] = (0.35, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a whole batch in one ``grid_sample``:
    (N, C, S, S) float -> (N, C, S, S). Each image gets its own crop box (area share in ``scale``, aspect
    in ``ratio``, inside the image) resampled bilinearly to the full size, mirrored with probability 1/2."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(*scale)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # box width / image width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates, box stays inside
    cy = (torch.rand(n) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_crop_flip(images: torch.Tensor, pad: int | None = None) -> torch.Tensor:
    """Padded random crop + horizontal flip for a whole batch: (N, C, S, S) float -> (N, C, S, S). Each image
    is shifted by its own whole-pixel offset in [-pad, pad] along each axis (default pad: S // 16, 2 px at
    32 px: at a 10-epoch budget the CIFAR recipe's S // 8 left ResNet-18 underfitting Fashion-MNIST), the
    uncovered border repeating the edge pixels (``replicate``), then mirrored with probability 1/2."""
    n, _, h, w = images.shape
    pad = max(1, h // 16) if pad is None else pad
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")  # (N, C, S + 2 pad, S + 2 pad)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device="cpu").to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device="cpu").to(images.device)
    rows = dy + torch.arange(h, device=images.device)  # (N, S): the source row of each output row
    cols = dx + torch.arange(w, device=images.device)  # (N, S)
    index = torch.arange(n, device=images.device).view(n, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[index, rows.view(n, h, 1), cols.view(n, 1, w)]  # (N, S, S, C)
    return random_hflip(crops.permute(0, 3, 1, 2))


# Training-time augmentation of normalised float batches, by name (``--augment``).
AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "none": None,
    "flip": random_hflip,
    "crop": random_crop_flip,
    "standard": random_resized_crop_flip,
}

Prepare = Callable[[torch.Tensor, bool], torch.Tensor]


def image_input(channels_last: bool = False, augment: str = "flip") -> Prepare:
    """uint8 images -> normalised float (N, 3, S, S) -> (augmentation when training)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
    transform = AUGMENTATIONS[augment]

    def prepare(images: torch.Tensor, training: bool) -> torch.Tensor:
        x = normalize_batch(images)
        if training and transform is not None:
            x = transform(x)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return prepare


def feature_input(features: torch.Tensor, training: bool) -> torch.Tensor:
    """Cached backbone features (N, F, h, w) go to the head as they are."""
    return features
