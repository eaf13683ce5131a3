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

from models.augment import AUGMENTATIONS, Prepare, feature_input, image_input
from models.data import ArrayDataset, ArraySplit, epoch_loader, set_epoch
from models.options import option
from models.schedules import Phase, apply_phase, param_groups, phase_at, plan, warmup_cosine

# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int  # images seen by all data-parallel ranks together
    seconds: float

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
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    on_step: Callable[[], None] | None = None) -> EpochStats:
    """One pass over ``loader``. ``frozen`` modules stay in eval mode (BatchNorm statistics do not move);
    ``scheduler`` steps after every optimizer step, then ``on_step`` is called (a runner's clock)."""
    model.train()
    for module in frozen:
        module.eval()
    prepare = prepare or image_input()
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    totals = torch.zeros(3, device=device)  # [sum of losses, correct, images], summed on device
    start = time.perf_counter()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        x = prepare(images, True)
        with _autocast(device, autocast_dtype):
            logits = model(x)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        n = targets.shape[0]
        totals += torch.stack([loss.detach().float() * n, (logits.argmax(1) == targets).sum().float(),
                               torch.tensor(float(n), device=device)])
    seconds = time.perf_counter() - start
    totals = _all_reduce(totals)  # images = all ranks' images: the epoch's global throughput
    return EpochStats(loss=(totals[0] / totals[2].clamp(min=1)).item(),
                      accuracy=(totals[1] / totals[2].clamp(min=1)).item(), images=int(totals[2].item()),
                      seconds=seconds)


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
    """The recipe of one fine-tuning run: schedule, budget, optimiser, regularisation, seed.

    Fields declared with ``option`` are user options: the flows' parameters, the Prefect form and the CLI
    are generated from these declarations (``models.options``)."""

    schedule: str = "full-ft"  # set from the head strategy (``parse_strategy(s).schedule``), not an option
    epochs: int = option(2, "training epochs", ge=1, le=1000)
    batch_size: int = option(64, "global batch size: images per optimizer step, split across the data-parallel "
                             "workers (each takes batch_size // workers)", ge=2, le=8192)
    lr: float = option(0.01, "peak learning rate of the head (SGD + Nesterov, cosine schedule); phases scale "
                       "the backbone's", gt=0.0, le=10.0)
    momentum: float = 0.9
    weight_decay: float = option(5e-4, "SGD weight decay", ge=0.0, le=1.0)
    warmup_epochs: float = option(0.0, "linear LR warm-up at the start of every phase, in epochs (then cosine "
                                  "to 0, per step)", ge=0.0, le=100.0)
    augment: str = option("flip", "training augmentation of image batches: none, flip (horizontal), crop (padded "
                          "random crop + flip), standard (RandomResizedCrop + flip); cached-feature probe "
                          "phases are never augmented",
                          choices=tuple(AUGMENTATIONS))
    label_smoothing: float = option(0.0, "label smoothing of the training loss", ge=0.0, lt=1.0)
    early_stopping_patience: int | None = option(
        None, "stop after this many epochs without a lower val loss and publish the best epoch's weights; "
        "empty = train every epoch, publish the last", ge=1, le=1000)
    probe_epochs: int | None = option(None, "lp-ft / gradual: epochs of the frozen first phase; empty = half "
                                      "the epochs", ge=1, le=999)
    cache_features: bool = option(True, "frozen phases train the head on backbone features computed once per "
                                  "image")
    precise_bn_batches: int = option(20, "after each epoch that trains the backbone, recompute exact BatchNorm "
                                     "statistics from this many batches (0 = off)", ge=0, le=10_000)
    probe_bn_stats: str = "target"  # frozen phases: BN statistics re-estimated on the training images (target,
    #                                 AdaBN) or kept from the pretrained weights (source)
    seed: int = option(0, "seed of the data split, init, shuffling, dropout and augmentation", ge=0,
                       le=2**31 - 1)


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
    final: bool = False  # the fit's last epoch (the budget's, or early stopping's)


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
    on_step: Callable[[], None] | None = None  # after every optimizer step (e.g. a benchmark's clock)
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


@dataclass
class PhaseRun:
    """What the epochs of one phase train with."""

    net: nn.Module  # what the steps run: the model, or only its head on cached features (wrapped, e.g. DDP)
    train_loader: Any
    val_loader: Any
    prepare: Prepare  # uint8 images (or cached features) -> the network's input
    frozen: tuple[nn.Module, ...]  # modules kept in eval mode during the steps (a frozen backbone's BN)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    feature_seconds: float = 0.0  # the one-time backbone pass, when this phase paid it


class _Inputs:
    """The fit's data as loaders: image arrays, and the backbone features a frozen phase computes once."""

    def __init__(self, cfg: FitConfig, hooks: FitHooks, train: ArraySplit, val: ArraySplit) -> None:
        self.cfg, self.hooks, self.train, self.val = cfg, hooks, train, val
        self.images = (ArrayDataset(train), ArrayDataset(val))
        self.features: tuple[TensorDataset, TensorDataset] | None = None
        self.batch = max(1, cfg.batch_size // hooks.world)  # this process's share of the global batch

    def loaders(self, sets: tuple[Dataset[Any], Dataset[Any]], pin: bool = False) -> tuple[Any, Any]:
        h, cfg = self.hooks, self.cfg
        return (h.wrap_loader(epoch_loader(sets[0], self.batch, rank=h.rank, world=h.world, seed=cfg.seed,
                                           shuffle=True, pin_memory=pin)),
                h.wrap_loader(epoch_loader(sets[1], self.batch * 2, rank=h.rank, world=h.world, seed=cfg.seed,
                                           shuffle=False)))

    def cached_features(self, backbone: nn.Module) -> tuple[tuple[TensorDataset, TensorDataset], float]:
        """(train, val) backbone features, computed on first use; and the seconds this call spent on them."""
        if self.features is not None:
            return self.features, 0.0
        started, h = time.perf_counter(), self.hooks
        self.features = tuple(TensorDataset(extract_features(  # type: ignore[assignment]
            backbone, torch.from_numpy(s.images), h.device, autocast_dtype=h.autocast_dtype,
            channels_last=h.channels_last), torch.from_numpy(s.labels)) for s in (self.train, self.val))
        return self.features, time.perf_counter() - started  # type: ignore[return-value]


def enter_phase(model: nn.Module, phase: Phase, inputs: _Inputs, resumed: FitState | None) -> PhaseRun:
    """Set up one phase: what trains (``apply_phase``), BN statistics adapted to the target before a frozen
    phase, the inputs (cached features or images), DDP wrap, loaders, a fresh SGD + Nesterov optimizer and
    the per-step warm-up + cosine schedule. ``resumed``: the checkpoint's state when it was taken inside this
    phase (the optimizer and schedule continue; BN adaptation already happened)."""
    cfg, hooks = inputs.cfg, inputs.hooks
    apply_phase(model, phase)
    if phase.frozen and resumed is None and cfg.probe_bn_stats == "target":
        adapt_loader, _ = inputs.loaders(inputs.images)
        recompute_bn_stats(model, adapt_loader, hooks.device, prepare=image_input(hooks.channels_last, "none"),
                           max_batches=max(cfg.precise_bn_batches, PROBE_BN_BATCHES))
    feature_seconds = 0.0
    if phase.frozen and cfg.cache_features:
        features, feature_seconds = inputs.cached_features(model.backbone)
        net = hooks.wrap_model(model.head)
        train_loader, val_loader = inputs.loaders(features)
        prepare, frozen = feature_input, ()
    else:
        net = hooks.wrap_model(model)
        train_loader, val_loader = inputs.loaders(inputs.images, hooks.pin_memory)
        prepare = image_input(hooks.channels_last, cfg.augment)
        frozen = (model.backbone,) if phase.frozen else ()
    optimizer = torch.optim.SGD(param_groups(model, phase, cfg.lr), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(phase.epochs * steps, round(cfg.warmup_epochs * steps)))
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
    return PhaseRun(net, train_loader, val_loader, prepare, frozen, optimizer, scheduler, feature_seconds)


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
    device, rank = hooks.device, hooks.rank
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
    inputs = _Inputs(cfg, hooks, train, val)
    current, run, stopped = -1, None, False
    for epoch in range(resume.epoch if resume else 0, cfg.epochs):
        index, phase, _ = phase_at(phases, epoch)
        if index != current:  # a new phase (or the one a checkpoint was taken in)
            current = index
            run = enter_phase(model, phase, inputs, resume if resume and resume.phase == index else None)
        assert run is not None
        set_epoch(run.train_loader, epoch)
        lr = run.optimizer.param_groups[-1]["lr"]  # the head group's LR at the epoch's first step
        stats = train_one_epoch(run.net, criterion, run.optimizer, run.train_loader, device,
                                autocast_dtype=hooks.autocast_dtype, prepare=run.prepare, frozen=run.frozen,
                                scheduler=run.scheduler, on_step=hooks.on_step)
        eval_started = time.perf_counter()
        if phase.train_backbone:
            recompute_bn_stats(run.net, run.train_loader, device, prepare=image_input(hooks.channels_last, "none"),
                               max_batches=cfg.precise_bn_batches)
        val_result = evaluate(run.net, eval_criterion, run.val_loader, device, autocast_dtype=hooks.autocast_dtype,
                              prepare=run.prepare)
        eval_seconds = time.perf_counter() - eval_started  # precise BN + validation
        row = {"epoch": epoch + 1, "phase": index + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "val_loss": val_result.loss, "val_accuracy": val_result.accuracy, "lr": lr,
               "images_per_second": stats.images_per_second, "epoch_seconds": stats.seconds,
               "eval_seconds": eval_seconds,
               "feature_seconds": run.feature_seconds}  # the one-time backbone pass, on the epoch that paid it
        run.feature_seconds = 0.0
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
                epoch=epoch + 1, phase=index, optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict(), history=list(history), best_epoch=best_epoch,
                best_val_loss=best_loss, best_weights=best_weights), final=stopped or epoch + 1 == cfg.epochs))
        if stopped:
            break
    if cfg.early_stopping_patience is not None and best_weights is not None:
        model.load_state_dict(best_weights)
        return FitResult(history, best_epoch, stopped)
    return FitResult(history, int(history[-1]["epoch"]) if history else 0, False)
