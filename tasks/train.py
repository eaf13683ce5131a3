"""Ray Train fine-tuning: data-parallel TorchTrainer over N workers, CPU or GPU, local or a cluster.

Ray appears only at ``prepare_model`` / ``prepare_data_loader`` / ``report`` / ``fit`` (the shape of Ray's
Fashion-MNIST Train example); the loop itself is ``models.engine.train_one_epoch``. Rank 0 logs each
epoch to MLflow by run id and writes a checkpoint (safetensors weights + optimizer state) that Ray
persists to the S3 checkpoint bucket; a restarted worker group resumes from the latest one.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from infra.errors import HeadbenchError
from infra.ray_cluster import LOOPBACK_ENV
from infra.settings import Settings
from infra.tracking import Tracker
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


class TrainingError(HeadbenchError):
    pass


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


@dataclass(frozen=True)
class TrainOutcome:
    state_dict: dict[str, torch.Tensor]  # final weights, unwrapped (no DDP prefixes)
    history: list[dict[str, float]]  # one row per epoch, as logged
    checkpoint_path: str  # where Ray persisted the last checkpoint


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
    tracker = Tracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
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
               "feature_seconds": feature_seconds}  # one-time backbone pass, on the epoch that paid it
        feature_seconds = 0.0
        history.append(row)
        if rank == 0:
            assert tracker is not None
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            print(_epoch_line(row, cfg.epochs, phase.name), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                save_state_dict(model, Path(tmp) / WEIGHTS_FILE)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "phase": index, "history": history}, Path(tmp) / TRAIN_STATE)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(row, checkpoint=None)


def _storage(settings: Settings) -> tuple[str, Any]:
    """Ray's storage path and a pyarrow S3 filesystem for the checkpoint bucket (no s3:// prefix)."""
    from pyarrow import fs

    endpoint = urlparse(settings.s3_endpoint_url or "")
    s3 = fs.S3FileSystem(
        endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "http",
        access_key=settings.aws_access_key_id.get_secret_value() if settings.aws_access_key_id else None,
        secret_key=settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None,
        region=settings.aws_region)
    return f"{settings.checkpoint_bucket}/ray", s3


def init_ray(settings: Settings) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a private local instance bound to 127.0.0.1
    (never attach to a cluster by accident, never listen on other interfaces)."""
    if not settings.ray_address or settings.ray_address.split(":")[0] in ("127.0.0.1", "localhost"):
        for key, value in LOOPBACK_ENV.items():  # read by ray at import time: set before importing it
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True, logging_level="WARNING")
    else:
        # The dashboard process serves Ray's state API, which Train V2's placement-group cleaner (and our
        # fault-injection tests) query; it binds 127.0.0.1 only.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True, logging_level="WARNING")


def cluster_cpus(settings: Settings) -> int:
    """CPUs of the Ray cluster this process trains on (starting or joining it first)."""
    init_ray(settings)  # first: it sets the variables ray reads when it is imported
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def run_training(cfg: TrainConfig, train: ArraySplit, val: ArraySplit, init_state: dict[str, torch.Tensor],
                 *, settings: Settings, tracking_uri: str, run_id: str, run_key: str) -> TrainOutcome:
    """Fit on Ray Train; ``run_key`` names the Ray run, so re-running the same key resumes it."""
    available = cluster_cpus(settings)  # starts or joins Ray before anything imports it
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = cfg.cpus_per_worker or max(1, available // cfg.workers)
    if cfg.workers * cpus > available and not cfg.use_gpu:
        raise TrainingError(f"workers={cfg.workers} x {cpus} CPU need {cfg.workers * cpus} CPUs but the Ray "
                            f"cluster has {available}; allowed: workers * cpus_per_worker <= {available}")
    storage_path, storage_fs = _storage(settings)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": asdict(cfg), "threads": cpus, "tracking_uri": tracking_uri,
                           "run_id": run_id, "data_ref": ray.put((train, val)), "init_ref": ray.put(init_state)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=run_key, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        message = str(root).strip().splitlines()[-1] if str(root).strip() else root.__class__.__name__
        raise TrainingError(f"training failed on Ray ({root.__class__.__name__}): {message}") from exc
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        from safetensors.torch import load_file

        state = load_file(Path(ckpt_dir) / WEIGHTS_FILE)
        history = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=True)["history"]
    return TrainOutcome(state_dict=state, history=list(history), checkpoint_path=result.checkpoint.path)


@task(name="train", cache_policy=NO_CACHE, log_prints=True)
def train_model(cfg: TrainConfig, train: ArraySplit, val: ArraySplit, init_state: dict[str, torch.Tensor],
                settings: Settings, tracking_uri: str, run_id: str, run_key: str) -> TrainOutcome:
    """Data-parallel fine-tuning on Ray Train, checkpointed to S3 every epoch."""
    return run_training(cfg, train, val, init_state, settings=settings, tracking_uri=tracking_uri,
                        run_id=run_id, run_key=run_key)

