"""The train task: data-parallel fine-tuning on Ray Train (``infra.training.trainer.run_training``), checkpointed to
S3 every epoch, resumed from the last checkpoint when the same run key runs again."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from infra.settings import Settings
from infra.tracking.progress import epoch_lines
from infra.training.trainer import TrainConfig, TrainOutcome, run_training
from models.data import ArraySplit
from tasks import TIMEOUT_S


@task(name="train", timeout_seconds=TIMEOUT_S["train"], cache_policy=NO_CACHE, log_prints=True)
def train_model(cfg: TrainConfig, train: ArraySplit, val: ArraySplit, init_state: dict[str, torch.Tensor],
                settings: Settings, tracking_uri: str, run_id: str, run_key: str) -> TrainOutcome:
    """Data-parallel fine-tuning on Ray Train, checkpointed to S3 every epoch; each epoch MLflow records is
    also a line of this task's Prefect log."""
    with epoch_lines(tracking_uri, run_id, get_run_logger().info):
        return run_training(cfg, train, val, init_state, settings=settings, tracking_uri=tracking_uri,
                            run_id=run_id, run_key=run_key)
