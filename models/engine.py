"""Plain training/evaluation loop functions (torchvision references style).

They take what they need as arguments and know nothing of Ray, MLflow or Prefect. Loss and correct counts
are accumulated on the device and read once per epoch, so the step loop has no host syncs.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.data import normalize_batch


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int  # images seen by all data-parallel ranks together
    seconds: float
    first_step_at: float = 0.0  # wall clock (time.time()) after the first optimizer step: start-up cost
    last_step_at: float = 0.0  # wall clock after the last optimizer step

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum across data-parallel ranks when a process group exists (DDP), identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip a random half of the batch left-right: (N, C, H, W) -> (N, C, H, W)."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu").lt(0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


Prepare = Callable[[torch.Tensor, bool], torch.Tensor]


def image_input(channels_last: bool = False, augment: bool = True) -> Prepare:
    """uint8 images -> (random hflip when training and augmenting) -> normalised float (N, 3, S, S)."""

    def prepare(images: torch.Tensor, training: bool) -> torch.Tensor:
        x = normalize_batch(random_hflip(images) if training and augment else images)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    return prepare


def feature_input(features: torch.Tensor, training: bool) -> torch.Tensor:
    """Cached backbone features (N, F, h, w) go to the head as they are."""
    return features


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, *,
                    autocast_dtype: torch.dtype | None = None, prepare: Prepare | None = None,
                    frozen: Sequence[nn.Module] = ()) -> EpochStats:
    """One pass over ``loader``. ``frozen`` modules stay in eval mode (BatchNorm statistics do not move)."""
    model.train()
    for module in frozen:
        module.eval()
    prepare = prepare or image_input()
    totals = torch.zeros(3, device=device)  # [sum of losses, correct, images], summed on device
    start, first_step_at = time.perf_counter(), 0.0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        x = prepare(images, True)
        with _autocast(device, autocast_dtype):
            logits = model(x)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not first_step_at:
            first_step_at = time.time()
        n = targets.shape[0]
        totals += torch.stack([loss.detach().float() * n, (logits.argmax(1) == targets).sum().float(),
                               torch.tensor(float(n), device=device)])
    seconds, last_step_at = time.perf_counter() - start, time.time()
    totals = _all_reduce(totals)  # images = all ranks' images: the epoch's global throughput
    return EpochStats(loss=(totals[0] / totals[2].clamp(min=1)).item(),
                      accuracy=(totals[1] / totals[2].clamp(min=1)).item(), images=int(totals[2].item()),
                      seconds=seconds, first_step_at=first_step_at, last_step_at=last_step_at)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) int64, this process's samples only
    targets: torch.Tensor  # (N,) int64


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, *, autocast_dtype: torch.dtype | None = None,
             prepare: Prepare | None = None) -> EvalResult:
    model.eval()
    prepare = prepare or image_input()
    totals = torch.zeros(3, device=device)
    preds, tgts = [], []
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        x = prepare(images, False)
        with _autocast(device, autocast_dtype):
            logits = model(x)
            loss = criterion(logits.float(), targets)
        pred = logits.argmax(1)
        n = targets.shape[0]
        totals += torch.stack([loss * n, (pred == targets).sum().float(), torch.tensor(float(n), device=device)])
        preds.append(pred.cpu())
        tgts.append(targets.cpu())
    totals = _all_reduce(totals)
    empty = torch.empty(0, dtype=torch.int64)
    return EvalResult(loss=(totals[0] / totals[2].clamp(min=1)).item(),
                      accuracy=(totals[1] / totals[2].clamp(min=1)).item(),
                      predictions=torch.cat(preds) if preds else empty,
                      targets=torch.cat(tgts) if tgts else empty)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, *, prepare: Prepare | None = None, max_batches: int = 20) -> int:
    """Precise BatchNorm (Wu & Johnson 2021): replace the running statistics by the exact average over
    ``max_batches`` training batches under the current weights.

    After a short fine-tuning the exponential running averages (momentum 0.1) still mix old-domain
    statistics with ones from weights that have since moved; in eval mode that mismatch compounds
    through the blocks and can blow up the logits. Returns the number of batches used.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    norms = [m for m in inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or max_batches <= 0:
        return 0
    prepare = prepare or image_input()
    momenta = [m.momentum for m in norms]
    was_training = inner.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: an exact mean over the batches seen
    inner.train()
    used = 0
    for images, _ in loader:
        if used >= max_batches:
            break
        inner(prepare(images.to(device, non_blocking=True), False))
        used += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        if dist.is_available() and dist.is_initialized():  # every rank ends with the same statistics
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(dist.get_world_size())
    inner.train(was_training)
    return used


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, device: torch.device, *, batch_size: int = 256,
                     autocast_dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Backbone features of uint8 images, computed once in eval mode: (N, C, S, S) -> (N, F, h, w) float32.

    Under DDP each rank computes a contiguous 1/world slice and the slices are all-gathered, so every
    image goes through the backbone exactly once and every rank ends with all features.
    """
    backbone.eval()
    prepare = image_input(channels_last)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    bounds = torch.linspace(0, len(images), world + 1).long().tolist()
    mine = images[bounds[rank]:bounds[rank + 1]]
    chunks = []
    for start in range(0, len(mine), batch_size):
        x = prepare(mine[start:start + batch_size].to(device), False)
        with _autocast(device, autocast_dtype):
            chunks.append(backbone(x).float())
    if not chunks:  # an empty slice still has to join the all-gather with the right shape
        probe = prepare(images[:1].to(device), False)
        chunks.append(backbone(probe).float()[:0])
    local = torch.cat(chunks)
    if world == 1:
        return local.cpu()
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    padded = torch.zeros((longest, *local.shape[1:]), device=local.device, dtype=local.dtype)
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:b - a] for g, a, b in zip(gathered, bounds[:-1], bounds[1:], strict=True)]).cpu()


@dataclass(frozen=True)
class ClassificationReport:
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = predicted class
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum() / self.confusion.sum().clamp(min=1))

    @property
    def macro_f1(self) -> float:
        return sum(self.f1) / len(self.f1)


def classification_report(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int
                          ) -> ClassificationReport:
    """Confusion matrix and per-class precision/recall/F1 (0 where undefined)."""
    flat = targets.long() * num_classes + predictions.long()
    confusion = torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return ClassificationReport(confusion=confusion, precision=precision.tolist(), recall=recall.tolist(),
                                f1=f1.tolist(), support=actual.long().tolist())
