"""Inference on image files with the preprocessing a published manifest records (pure PyTorch + PIL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from models.data import normalize_batch, resize_uint8
from models.heads import HeadConfig
from models.net import HeadNet, build_model
from models.weights import load_exact

# ITU-R 601 luma, the weights PIL's convert("L") uses: RGB input to a model trained on grayscale
LUMA = (0.299, 0.587, 0.114)


def model_from_manifest(manifest: Mapping[str, Any], state: dict[str, torch.Tensor]) -> HeadNet:
    """Rebuild a published model from its manifest and load its weights (either key format) strictly."""
    head = manifest.get("head", {})
    model = build_model(manifest["arch"], int(manifest["num_classes"]), manifest["strategy"], None,
                        hidden_dim=int(head.get("hidden_dim", HeadConfig.hidden_dim)),
                        dropout=float(head.get("dropout", HeadConfig.dropout)))
    load_exact(model, state)
    return model.eval()


def prepare_images(images: np.ndarray, image_size: int, channels: int) -> torch.Tensor:
    """uint8 arrays as users hold them -> the uint8 (N, C, S, S) batch the model was trained on.

    (N, H, W) is grayscale, (N, H, W, 3) RGB; either is converted to the training images' channel count
    (gray replicated, or RGB -> luma) and resized like the training data (antialiased bilinear)."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        gray = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(1)  # (N, 1, H, W)
        batch = gray if channels == 1 else gray.expand(-1, 3, -1, -1)
    elif array.ndim == 4 and array.shape[-1] == 3:
        rgb = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        if channels == 1:
            weights = torch.tensor(LUMA).view(1, 3, 1, 1)
            rgb = (rgb.float() * weights).sum(1, keepdim=True).round().clamp_(0, 255).to(torch.uint8)
        batch = rgb
    else:
        raise ValueError(f"images of shape {tuple(array.shape)}: expected (N, H, W) grayscale or (N, H, W, 3) RGB")
    if batch.shape[0] == 0:
        raise ValueError("no images given")
    return torch.from_numpy(resize_uint8(batch.contiguous().numpy(), image_size))


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


@torch.no_grad()
def inference_speed(model: nn.Module, images: torch.Tensor, *, single_runs: int = 40, batch: int = 64,
                    batch_runs: int = 3, budget_s: float = 4.0) -> dict[str, float]:
    """Latency p50/p95 (ms) of one image, and throughput (img/s) at ``batch``, on the model's device.

    images: uint8 (N, C, S, S) test images (cycled to fill the batch); preprocessing (normalisation) is
    timed too, as a caller pays for it. Warm-up runs are not timed; ``budget_s`` caps each measurement."""
    import time

    model = model.eval()
    device = next(model.parameters()).device
    one = images[:1].to(device)
    full = images[torch.arange(batch) % len(images)].to(device)
    for _ in range(3):
        model(normalize_batch(one))
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < single_runs and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        model(normalize_batch(one))
        times.append(time.perf_counter() - start)
    model(normalize_batch(full))  # warm-up at the batch size
    rates: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(rates) < batch_runs and (not rates or time.perf_counter() < deadline):
        start = time.perf_counter()
        model(normalize_batch(full))
        rates.append(batch / (time.perf_counter() - start))
    ms = np.array(times) * 1000
    return {"latency_p50_ms": float(np.percentile(ms, 50)), "latency_p95_ms": float(np.percentile(ms, 95)),
            f"throughput_b{batch}_img_s": float(np.median(rates))}
