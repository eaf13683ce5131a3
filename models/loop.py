"""The training loop: ``fit`` runs a schedule's phases over uint8 image arrays, and the epoch functions it
is made of (torchvision references style).

Nothing here knows Ray, MLflow or Prefect. A data-parallel runner (the Ray Train worker) passes its rank,
world size and device, wraps the model and loaders (DDP, device moves) and receives every epoch through
``FitHooks``; a plain script calls ``fit`` with the defaults and gets the same loop in one process. Loss
and correct counts are accumulated on the device and read once per epoch, so the step loop has no host
syncs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from models.augment import Prepare, feature_input, image_input
from models.data import ArrayDataset, ArraySplit, epoch_loader, set_epoch
from models.schedules import Phase, apply_phase, param_groups, phase_at, plan, warmup_cosine

# --------------------------------------------------------------------------------------------- inputs


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


# --------------------------------------------------------------------------------------------- epochs


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, *,
                    autocast_dtype: torch.dtype | None = None, prepare: Prepare | None = None,
                    frozen: Sequence[nn.Module] = (),
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> EpochStats:
    """One pass over ``loader``. ``frozen`` modules stay in eval mode (BatchNorm statistics do not move);
    ``scheduler`` steps after every optimizer step."""
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
        if scheduler is not None:
            scheduler.step()
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
    probabilities: torch.Tensor  # (N, K) float32 softmax of the logits


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, *, autocast_dtype: torch.dtype | None = None,
             prepare: Prepare | None = None) -> EvalResult:
    model.eval()
    prepare = prepare or image_input()
    totals = torch.zeros(3, device=device)
    preds, tgts, probs = [], [], []
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
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    totals = _all_reduce(totals)
    empty = torch.empty(0, dtype=torch.int64)
    return EvalResult(loss=(totals[0] / totals[2].clamp(min=1)).item(),
                      accuracy=(totals[1] / totals[2].clamp(min=1)).item(),
                      predictions=torch.cat(preds) if preds else empty,
                      targets=torch.cat(tgts) if tgts else empty,
                      probabilities=torch.cat(probs) if probs else torch.empty(0, 0))


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, *, prepare: Prepare | None = None, max_batches: int = 20) -> int:
    """Precise BatchNorm (Wu & Johnson 2021): replace the running statistics by the exact average over
    ``max_batches`` training batches under the current weights.

    After a short fine-tuning the exponential running averages (momentum 0.1) still mix old-domain
    statistics with ones from weights that have since moved; in eval mode that mismatch compounds
    through the blocks and can blow up the logits. Before a frozen phase the same pass adapts source
    statistics to the target data (AdaBN). Returns the number of batches used.
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


# --------------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class FitConfig:
    """The recipe of one fine-tuning run: schedule, budget, optimiser, regularisation, seed."""

    schedule: str = "full-ft"
    epochs: int = 2
    batch_size: int = 64  # per process: a data-parallel runner passes its share of the global batch
    lr: float = 0.01  # base LR of the head group (SGD + Nesterov); phases scale it
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0  # linear LR warm-up at the start of every phase, then cosine to 0 per step
    label_smoothing: float = 0.0
    augment: str = "flip"  # a key of AUGMENTATIONS; cached-feature phases are never augmented
    probe_epochs: int | None = None  # two-phase schedules: epochs of the frozen first phase (default half)
    cache_features: bool = True  # frozen phases train the head on backbone features computed once
    precise_bn_batches: int = 20  # exact BN statistics from N batches after each epoch that trains the backbone
    probe_bn_stats: str = "target"  # frozen phases: BN statistics re-estimated on the training images (target,
    #                                 AdaBN) or kept from the pretrained weights (source)
    early_stopping_patience: int | None = None  # stop after N epochs without a better val loss; keep the best
    seed: int = 0  # data order (the sampler's seed), dropout and augmentation


@dataclass
class FitState:
    """Everything needed to continue a fit after ``epoch`` completed epochs (a checkpoint's content)."""

    epoch: int
    phase: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, float]]
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_weights: dict[str, torch.Tensor] | None = None  # only with early stopping

    def train_state(self) -> dict[str, Any]:
        """The non-weight part, loadable with ``torch.load(weights_only=True)``."""
        return {"epoch": self.epoch, "phase": self.phase, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "history": self.history, "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss}

    @classmethod
    def from_train_state(cls, saved: dict[str, Any], best_weights: dict[str, torch.Tensor] | None) -> FitState:
        return cls(epoch=int(saved["epoch"]), phase=int(saved["phase"]), optimizer=saved["optimizer"],
                   scheduler=saved["scheduler"], history=list(saved["history"]),
                   best_epoch=int(saved.get("best_epoch", 0)),
                   best_val_loss=float(saved.get("best_val_loss", math.inf)), best_weights=best_weights)


@dataclass(frozen=True)
class EpochEnd:
    """What a runner receives after every epoch: the history row, the model and the state to checkpoint."""

    row: dict[str, float]
    phase: Phase
    model: nn.Module  # unwrapped (no DDP)
    state: FitState


def _identity(x: Any) -> Any:
    return x


@dataclass
class FitHooks:
    """What a runner supplies: where this process sits, how to wrap models and loaders, where epochs go."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[nn.Module], nn.Module] = _identity  # e.g. DDP (Ray's prepare_model)
    wrap_loader: Callable[[DataLoader[Any]], DataLoader[Any]] = _identity  # e.g. device moves
    on_epoch: Callable[[EpochEnd], None] | None = None  # report, log, checkpoint
    resume: FitState | None = None
    autocast_dtype: torch.dtype | None = None  # bf16 on GPU
    channels_last: bool = False
    pin_memory: bool = False


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int  # the epoch whose weights ``model`` holds at the end (the last one without early stopping)
    stopped_early: bool


# DistributedDataParallel options of every data-parallel runner (Ray Train's workers, the bench's torch DDP
# baseline). gradient_as_bucket_view: gradients are views into the all-reduce buckets, not a second copy of
# every gradient (a model's worth of memory less per worker); no option changed the speed beyond the noise
# on CPU (`python -m bench ddp-options`, docs/performance.md).
DDP_OPTIONS: dict[str, Any] = {"gradient_as_bucket_view": True}

PROBE_BN_BATCHES = 20  # batches that estimate target BN statistics before a frozen phase (at least)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(model: nn.Module, cfg: FitConfig, train: ArraySplit, val: ArraySplit,
        hooks: FitHooks | None = None) -> FitResult:
    """Train ``model`` (a HeadNet: ``backbone`` + ``head``) through the phases of ``cfg.schedule``.

    Each phase sets what trains and the LR of every parameter group, with a fresh SGD + Nesterov optimizer
    and a per-step warm-up + cosine LR. A frozen phase first re-estimates BatchNorm statistics on the
    training images (AdaBN: the head learns on target-normalised features, which is also what a later
    fine-tuning phase in train mode gives it) and, with ``cache_features``, trains the head on backbone
    features computed once. Every epoch ends with a history row (train/val loss and accuracy, LR, img/s)
    handed to ``hooks.on_epoch``. With early stopping the model ends with the best epoch's weights.
    """
    hooks = hooks or FitHooks()
    device, rank, world = hooks.device, hooks.rank, hooks.world
    phases = plan(cfg.schedule, cfg.epochs, cfg.probe_epochs)
    # distinct per rank (augmentation, dropout), equal for equal seeds; the data order has its own seed
    torch.manual_seed(cfg.seed * 65_537 + rank)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()  # val loss stays comparable across label-smoothing settings
    resume = hooks.resume
    history = list(resume.history) if resume else []
    best_epoch = resume.best_epoch if resume else 0
    best_loss = resume.best_val_loss if resume else math.inf
    best_weights = resume.best_weights if resume else None
    stale = sum(1 for _ in itertools.takewhile(lambda r: r["epoch"] > best_epoch, reversed(history)))
    images_train, images_val = ArrayDataset(train), ArrayDataset(val)

    def loaders(train_set: Dataset[Any], val_set: Dataset[Any], pin: bool) -> tuple[Any, Any]:
        return (hooks.wrap_loader(epoch_loader(train_set, cfg.batch_size, rank=rank, world=world, seed=cfg.seed,
                                               shuffle=True, pin_memory=pin)),
                hooks.wrap_loader(epoch_loader(val_set, cfg.batch_size * 2, rank=rank, world=world, seed=cfg.seed,
                                               shuffle=False)))

    image_prepare = image_input(hooks.channels_last, cfg.augment)
    current, cached, feature_seconds, stopped = -1, None, 0.0, False
    start_epoch = resume.epoch if resume else 0
    for epoch in range(start_epoch, cfg.epochs):
        index, phase, _ = phase_at(phases, epoch)
        if index != current:  # enter a phase: what trains, param groups, LR schedule, inputs, DDP wrapper
            current = index
            entering = not (resume and resume.phase == index)
            apply_phase(model, phase)
            use_cache = phase.frozen and cfg.cache_features
            if phase.frozen and entering and cfg.probe_bn_stats == "target":
                adapt_loader, _ = loaders(images_train, images_val, False)
                recompute_bn_stats(model, adapt_loader, device, prepare=image_input(hooks.channels_last, "none"),
                                   max_batches=max(cfg.precise_bn_batches, PROBE_BN_BATCHES))
            if use_cache:
                if cached is None:  # backbone features, computed once per image for all frozen epochs
                    extraction_started = time.perf_counter()
                    cached = tuple(TensorDataset(extract_features(
                        model.backbone, torch.from_numpy(s.images), device, autocast_dtype=hooks.autocast_dtype,
                        channels_last=hooks.channels_last), torch.from_numpy(s.labels)) for s in (train, val))
                    feature_seconds = time.perf_counter() - extraction_started
                net = hooks.wrap_model(model.head)
                train_loader, val_loader = loaders(cached[0], cached[1], False)
                prepare, frozen = feature_input, ()
            else:
                net = hooks.wrap_model(model)
                train_loader, val_loader = loaders(images_train, images_val, hooks.pin_memory)
                prepare, frozen = image_prepare, ((model.backbone,) if phase.frozen else ())
            optimizer = torch.optim.SGD(param_groups(model, phase, cfg.lr), momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, nesterov=True)
            steps = len(train_loader)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, warmup_cosine(phase.epochs * steps, round(cfg.warmup_epochs * steps)))
            if not entering:
                assert resume is not None
                optimizer.load_state_dict(resume.optimizer)
                scheduler.load_state_dict(resume.scheduler)
        set_epoch(train_loader, epoch)
        lr = optimizer.param_groups[-1]["lr"]  # the head group's LR at the epoch's first step
        stats = train_one_epoch(net, criterion, optimizer, train_loader, device, autocast_dtype=hooks.autocast_dtype,
                                prepare=prepare, frozen=frozen, scheduler=scheduler)
        if phase.train_backbone:
            recompute_bn_stats(net, train_loader, device, prepare=image_input(hooks.channels_last, "none"),
                               max_batches=cfg.precise_bn_batches)
        val_result = evaluate(net, eval_criterion, val_loader, device, autocast_dtype=hooks.autocast_dtype,
                              prepare=prepare)
        row = {"epoch": epoch + 1, "phase": index + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "val_loss": val_result.loss, "val_accuracy": val_result.accuracy, "lr": lr,
               "images_per_second": stats.images_per_second, "epoch_seconds": stats.seconds,
               "feature_seconds": feature_seconds,  # one-time backbone pass, on the epoch that paid it
               "first_step_at": stats.first_step_at, "last_step_at": stats.last_step_at}  # wall clock, for bench
        feature_seconds = 0.0
        history.append(row)
        if val_result.loss < best_loss:  # the same on every rank: val loss is all-reduced
            best_loss, best_epoch, stale = val_result.loss, epoch + 1, 0
            if cfg.early_stopping_patience is not None:
                best_weights = _state_copy(model)
        else:
            stale += 1
        stopped = cfg.early_stopping_patience is not None and stale >= cfg.early_stopping_patience
        if hooks.on_epoch is not None:
            hooks.on_epoch(EpochEnd(row, phase, model, FitState(
                epoch=epoch + 1, phase=index, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                history=list(history), best_epoch=best_epoch, best_val_loss=best_loss, best_weights=best_weights)))
        if stopped:
            break
    if cfg.early_stopping_patience is not None and best_weights is not None:
        model.load_state_dict(best_weights)
        return FitResult(history, best_epoch, stopped)
    return FitResult(history, int(history[-1]["epoch"]) if history else 0, False)
