"""The Ray Train worker loop: what runs inside each of the N data-parallel worker processes.

Kept apart from the Prefect task (``tasks/train.py``) so a worker imports only torch, ray.train and
``models`` (rank 0 adds the MLflow client to log its epochs): every import here is resident memory in
every worker. The loop itself is ``models.engine.train_one_epoch``; Ray appears at ``prepare_model`` /
``prepare_data_loader`` / ``report`` (the shape of Ray's Fashion-MNIST Train example).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model, parse_strategy
from models.data import ArrayDataset, ArraySplit
from models.engine import (
    evaluate,
    extract_features,
    feature_input,
    image_input,
    recompute_bn_stats,
    train_one_epoch,
)
from models.schedules import apply_phase, param_groups, phase_at, plan
from models.weights import WEIGHTS_FILE, save_state_dict

TRAIN_STATE = "train_state.pt"
NOT_METRICS = {"epoch", "first_step_at", "last_step_at"}  # history columns that are not MLflow metrics


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and resources of one fine-tuning run (logged to MLflow as params)."""

    arch: str
    strategy: str
    num_classes: int
    epochs: int
    batch_size: int  # global batch: each of N workers takes batch_size // N
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    hidden_dim: int = 512
    dropout: float = 0.2
    workers: int = 2
    cpus_per_worker: int | None = None  # default: the cluster's CPUs shared evenly
    use_gpu: bool = False
    seed: int = 0
    augment: bool = True  # random horizontal flips (image phases only)
    max_failures: int = 2
    probe_epochs: int | None = None  # two-phase schedules: epochs of the frozen first phase (default half)
    cache_features: bool = True  # frozen phases train the head on backbone features computed once
    precise_bn_batches: int = 20  # after each epoch that trains the backbone, exact BN stats from N batches
    placement_strategy: str = "PACK"  # Ray placement group of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD


def _epoch_line(row: dict[str, float], epochs: int, phase: str) -> str:
    return (f"epoch {int(row['epoch'])}/{epochs} [{phase}] train_loss={row['train_loss']:.4f} "
            f"train_acc={row['train_accuracy']:.4f} val_loss={row['val_loss']:.4f} "
            f"val_acc={row['val_accuracy']:.4f} {row['images_per_second']:.0f} img/s {row['epoch_seconds']:.1f} s"
            + (f" (+{row['feature_seconds']:.1f} s computing features once)" if row["feature_seconds"] else ""))


def _loaders(x: torch.Tensor | ArraySplit, y: torch.Tensor | None, val_x: torch.Tensor | ArraySplit,
             val_y: torch.Tensor | None, batch: int, world: int, pin: bool) -> tuple[Any, Any]:
    """Ray-prepared (DistributedSampler, device moves) loaders over images or cached features."""
    import ray.train.torch

    def dataset(a: torch.Tensor | ArraySplit, b: torch.Tensor | None) -> torch.utils.data.Dataset[Any]:
        return ArrayDataset(a) if isinstance(a, ArraySplit) else torch.utils.data.TensorDataset(a, b)

    data = dataset(x, y)
    # drop the ragged last batch (a batch of one cannot be normalised by BatchNorm in training mode),
    # unless a rank's share is smaller than one batch
    train = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, pin_memory=pin,
                                        drop_last=len(data) // world >= batch)
    val = torch.utils.data.DataLoader(dataset(val_x, val_y), batch_size=batch * 2, shuffle=False)
    return ray.train.torch.prepare_data_loader(train), ray.train.torch.prepare_data_loader(val)


def log_epochs(tracker: Any, rows: list[dict[str, float]]) -> None:
    """Per-epoch metrics to MLflow, step = epoch (rank 0)."""
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k not in NOT_METRICS}, step=int(row["epoch"]))


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the schedule's phases, one checkpoint per epoch."""
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])  # never above this worker's CPU share (it halves speed)
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu else None

    train_split, val_split = ray.get(config["data_ref"])  # zero-copy numpy views from the object store
    model = build_model(cfg.arch, cfg.num_classes, cfg.strategy, None, hidden_dim=cfg.hidden_dim,
                        dropout=cfg.dropout)
    model.load_state_dict(ray.get(config["init_ref"]))
    phases = plan(parse_strategy(cfg.strategy).schedule, cfg.epochs, cfg.probe_epochs)
    start_epoch, history, saved = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a worker failure: weights, optimizer, schedule, history
        with checkpoint.as_directory() as ckpt_dir:
            model.load_state_dict(load_file(Path(ckpt_dir) / WEIGHTS_FILE))
            saved = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=True)
        start_epoch, history = int(saved["epoch"]) + 1, list(saved["history"])
    model.to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    per_worker_batch = max(1, cfg.batch_size // world)
    criterion = nn.CrossEntropyLoss()
    tracker = None
    if rank == 0:
        from infra.tracking import Tracker  # MLflow client: rank 0 only

        tracker = Tracker(config["tracking_uri"], config["run_id"])
        if history:  # resumed: log the checkpointed epochs the failed attempt did not get to log
            logged = {m.step for m in tracker.client.get_metric_history(tracker.run_id, "train_loss")}
            log_epochs(tracker, [row for row in history if int(row["epoch"]) not in logged])
    current, cached, feature_seconds = -1, None, 0.0

    for epoch in range(start_epoch, cfg.epochs):
        index, phase, _ = phase_at(phases, epoch)
        if index != current:  # enter a phase: what trains, param groups, LR schedule, inputs, DDP wrapper
            current = index
            apply_phase(model, phase)
            optimizer = torch.optim.SGD(param_groups(model, phase, cfg.lr), momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, nesterov=True)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase.epochs)
            if saved is not None and saved.get("phase") == index:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            use_cache = phase.frozen and cfg.cache_features
            if use_cache:
                if cached is None:  # backbone features, computed once per image for all frozen epochs
                    extraction_started = time.perf_counter()
                    cached = tuple(extract_features(model.backbone, torch.from_numpy(s.images), device,
                                                    autocast_dtype=amp, channels_last=on_gpu)
                                   for s in (train_split, val_split))
                    feature_seconds = time.perf_counter() - extraction_started
                net = ray.train.torch.prepare_model(model.head, move_to_device=False)
                train_loader, val_loader = _loaders(cached[0], torch.from_numpy(train_split.labels), cached[1],
                                                    torch.from_numpy(val_split.labels), per_worker_batch, world, False)
                prepare, frozen = feature_input, ()
            else:
                net = ray.train.torch.prepare_model(model, move_to_device=False)
                train_loader, val_loader = _loaders(train_split, None, val_split, None, per_worker_batch, world,
                                                    on_gpu)
                prepare = image_input(channels_last=on_gpu, augment=cfg.augment)
                frozen = (model.backbone,) if phase.frozen else ()
        stats = train_one_epoch(net, criterion, optimizer, train_loader, device, autocast_dtype=amp,
                                prepare=prepare, frozen=frozen)
        if phase.train_backbone:
            recompute_bn_stats(net, train_loader, device, prepare=prepare, max_batches=cfg.precise_bn_batches)
        val = evaluate(net, criterion, val_loader, device, autocast_dtype=amp, prepare=prepare)
        lr = optimizer.param_groups[-1]["lr"]  # the head group's LR
        scheduler.step()
        row = {"epoch": epoch + 1, "phase": index + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "val_loss": val.loss, "val_accuracy": val.accuracy, "lr": lr,
               "images_per_second": stats.images_per_second, "epoch_seconds": stats.seconds,
               "feature_seconds": feature_seconds,  # one-time backbone pass, on the epoch that paid it
               "first_step_at": stats.first_step_at, "last_step_at": stats.last_step_at}  # wall clock, for bench
        feature_seconds = 0.0
        history.append(row)
        if rank == 0:
            assert tracker is not None
            print(_epoch_line(row, cfg.epochs, phase.name), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                save_state_dict(model, Path(tmp) / WEIGHTS_FILE)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "phase": index, "history": history}, Path(tmp) / TRAIN_STATE)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # logged only once the checkpoint holding this epoch is persisted: a crash in between loses the
            # log line, which the resumed run backfills from the checkpoint's history (never a duplicate)
            log_epochs(tracker, [row])
        else:
            ray.train.report(row, checkpoint=None)
