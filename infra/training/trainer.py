"""Ray Train fine-tuning, the driver side: data-parallel TorchTrainer over N workers, CPU or GPU, local or a
cluster (joining or starting Ray, refusing a placement the cluster cannot hold, the trainer, the result).

The loop each worker runs is ``infra.training.worker.train_worker`` (``models.loop.fit`` inside); the Prefect
task around this is ``tasks.train.train_model``. Rank 0 writes a checkpoint each epoch (safetensors weights +
optimizer state) that Ray persists to the S3 checkpoint bucket, and a restarted worker group resumes from the
latest one; Train's controller then logs the epoch to MLflow by run id (``infra.training.epoch_log``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from infra.errors import HeadbenchError
from infra.processes.interrupts import fit_interruptibly
from infra.settings import Settings
from infra.storage.checkpoints import ray_storage
from infra.training.cluster import check_gpus, check_placement, cluster_node_cpus, even_share, node_gpus
from infra.training.prestart import prestart_train_workers, worker_runtime_env
from infra.training.timeline import mark
from infra.training.worker import TrainConfig, load_checkpoint, train_worker
from models.data import ArraySplit, check_batch_split
from models.loop import FitState
from models.schedules import plan

__all__ = ["RAY_TRAIN_PREFIX", "TrainConfig", "TrainOutcome", "TrainingError", "augmentation_note", "build_trainer",
           "final_checkpoint", "run_training"]

RAY_TRAIN_PREFIX = "ray"  # in the checkpoint bucket: ray/<run key>/checkpoint_*/ per Ray Train run


class TrainingError(HeadbenchError):
    pass


@dataclass(frozen=True)
class TrainOutcome:
    state_dict: dict[str, torch.Tensor]  # the weights to publish, unwrapped (no DDP prefixes): the last
    #                                      epoch's, or the best epoch's under early stopping
    history: list[dict[str, float]]  # one row per epoch, as logged
    best_epoch: int  # the epoch whose weights ``state_dict`` holds
    stopped_early: bool
    checkpoint_path: str  # where Ray persisted the last checkpoint
    ray_job_id: str  # the driver's Ray job: its RayTrainWorker actors (and their nodes) in Ray's state API
    ray_nodes: int  # alive nodes of the cluster when training started
    augmentation: str  # what the augmentation applied to, e.g. "flip on image phases; none on cached features"

    def tags(self) -> dict[str, str]:
        """MLflow tags that say where the run trained, which epoch was kept and what was augmented."""
        return {"ray.job_id": self.ray_job_id, "ray.nodes": str(self.ray_nodes), "chosen_epoch": str(self.best_epoch),
                "stopped_early": str(self.stopped_early).lower(), "augmentation": self.augmentation}


def augmentation_note(cfg: TrainConfig) -> str:
    """Which phases the augmentation reached: cached-feature phases see each image once, unaugmented."""
    fit = cfg.fit
    phases = plan(fit.schedule, fit.epochs, fit.probe_epochs)
    cached = fit.cache_features and any(p.frozen for p in phases)
    if fit.augment == "none":
        return "none"
    if cached and all(p.frozen for p in phases):
        return f"none: {fit.augment} does not apply to cached backbone features"
    return f"{fit.augment} on image phases" + ("; cached-feature phases unaugmented" if cached else "")


@functools.cache
def trainer_class(base: type) -> type:
    """``base`` (TorchTrainer) without Ray Data's per-run plumbing when no Ray Dataset is passed, as here (the
    arrays travel through the object store): Train's datasets callback would start a DatasetManager actor
    next to the controller, a process that imports Ray Data, and make every worker import Ray Data to
    receive a DataContext, all before the first step. Nothing else changes: workers get no dataset shard
    provider, which only ``ray.train.get_dataset_shard`` (never called here) would need. Ray's private API:
    ``infra.training.ray_private``."""
    from infra.training.ray_private import without_datasets_callback

    return without_datasets_callback(base)


def build_trainer(cfg: TrainConfig, train: ArraySplit, val: ArraySplit, init_state: dict[str, torch.Tensor],
                  cpus: int, run_config: Any) -> Any:
    """The TorchTrainer that runs ``train_worker`` on ``cfg.resources.workers`` workers of ``cpus`` CPUs each (and
    a GPU each with ``cfg.resources.use_gpu``); the arrays and the initial weights go through the object store once."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    return trainer_class(TorchTrainer)(
        train_worker,
        train_loop_config={"train": asdict(cfg), "threads": cpus, "data_ref": ray.put((train, val)),
                           "init_ref": ray.put(init_state)},
        scaling_config=ScalingConfig(num_workers=cfg.resources.workers, use_gpu=cfg.resources.use_gpu,
                                     resources_per_worker={"CPU": cpus},
                                     placement_strategy=cfg.resources.placement_strategy),
        run_config=run_config)


def final_checkpoint(result: Any) -> tuple[dict[str, torch.Tensor], FitState]:
    """(last weights, fit state) of a finished Ray Train result's latest checkpoint."""
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        return load_checkpoint(Path(ckpt_dir))


def run_training(cfg: TrainConfig, train: ArraySplit, val: ArraySplit, init_state: dict[str, torch.Tensor],
                 *, settings: Settings, tracking_uri: str, run_id: str, run_key: str) -> TrainOutcome:
    """Fit on Ray Train; ``run_key`` names the Ray run, so re-running the same key resumes it."""
    try:  # before Ray starts: a batch of one reaches BatchNorm only inside a worker, retried max_failures times
        check_batch_split(cfg.fit.batch_size, cfg.resources.workers, len(train))
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    mark("ray-connect")
    nodes = cluster_node_cpus(settings)  # starts or joins Ray before anything imports it
    mark("ray-connected")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from infra.training.epoch_log import EpochLog, ImportMlflowDuringEpoch1, MlflowEpochs

    res = cfg.resources
    cpus = res.cpus_per_worker or even_share(res.workers, nodes)
    check_placement(res.workers, cpus, res.placement_strategy, nodes)
    if res.use_gpu:
        check_gpus(res.workers, node_gpus())
    if settings.ray_prestart:  # the worker processes start, and import, while the controller starts
        prestart_train_workers(res.workers, worker_runtime_env())
    mark("workers-prestarted")
    storage_path, storage_fs = ray_storage(settings, RAY_TRAIN_PREFIX)
    epoch_log = EpochLog(tracking_uri, run_id, cfg.strategy, cfg.fit.epochs, cfg.fit.probe_epochs)
    trainer = build_trainer(cfg, train, val, init_state, cpus, RunConfig(
        name=run_key, storage_path=storage_path, storage_filesystem=storage_fs,
        worker_runtime_env=worker_runtime_env(), failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=[MlflowEpochs(epoch_log), ImportMlflowDuringEpoch1()]))
    mark("fit-called")
    try:
        result = fit_interruptibly(trainer)
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        message = str(root).strip().splitlines()[-1] if str(root).strip() else root.__class__.__name__
        raise TrainingError(f"training failed on Ray ({root.__class__.__name__}): {message}") from exc
    mark("fit-returned")
    last, state = final_checkpoint(result)
    mark("final-weights")
    epoch_log.sync(state.history)  # what the controller could not log (MLflow briefly unreachable), if any
    keep_best = cfg.fit.early_stopping_patience is not None and state.best_weights is not None
    stopped = keep_best and state.epoch < cfg.fit.epochs
    return TrainOutcome(state_dict=state.best_weights if keep_best else last,  # type: ignore[arg-type]
                        history=state.history, best_epoch=state.best_epoch if keep_best else state.epoch,
                        stopped_early=stopped, checkpoint_path=result.checkpoint.path,
                        ray_job_id=ray.get_runtime_context().get_job_id(), ray_nodes=len(nodes),
                        augmentation=augmentation_note(cfg))
