"""Inference on image files with the preprocessing a published manifest records (pure PyTorch + PIL)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from models.data import normalize_batch, resize_uint8


def load_images(paths: Sequence[Path], image_size: int, channels: int = 3) -> torch.Tensor:
    """Files -> uint8 (N, C, S, S), decoded and resized exactly as training data was (antialiased bilinear
    on uint8); grayscale models get 'L' images, RGB models 'RGB'."""
    mode = "L" if channels == 1 else "RGB"
    batch = []
    for path in paths:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert(mode))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None
        batch.append(resize_uint8(array[None], image_size)[0])
    return torch.from_numpy(np.stack(batch))


@torch.no_grad()
def top_k(model: nn.Module, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, S, S) -> (probabilities, class indices), each (N, k), most probable first."""
    probs = torch.softmax(model.eval()(normalize_batch(images)), dim=1)
    return probs.topk(min(k, probs.shape[1]), dim=1)
