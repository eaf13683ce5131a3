"""What a Ray Train worker reports each epoch, as Train's controller reads it: the report's keys, which of a
history row's columns are MLflow metrics, and the epoch's line, wherever it is printed.

Nothing here imports torch or ``models``: Train's controller imports this (through ``infra.training.epoch_log``, when
it unpickles the run's callbacks), and needs no more of the worker's code to log an epoch. (The controller
imports torch all the same: the trainer's backend config, Ray's ``TorchConfig``, which it unpickles, is
defined beside ``import torch``; docs/performance.md, *Start-up: CPU by process*.)
"""

from __future__ import annotations

from collections.abc import Mapping

HISTORY_KEY = "history"  # rank 0's report: its epoch row plus the whole history under this key
# wall clock, in the first row: the worker process started, had its imports (``infra.training.worker.preload``),
# entered the training function, had its data and model
STARTUP_KEYS = frozenset({"worker_started_at", "worker_preloaded_at", "worker_entered_at", "worker_ready_at"})
NOT_METRICS = frozenset({"epoch", "first_step_at", "last_step_at"}) | STARTUP_KEYS  # history columns, not metrics


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """The MLflow metrics of a history row (no epoch number, step times or start-up clock)."""
    return {k: v for k, v in row.items() if k not in NOT_METRICS}


def epoch_line(epoch: int, epochs: int, phase: str, m: Mapping[str, float]) -> str:
    """The one epoch line: 'epoch 2/5 [finetune] train_loss=0.4100 train_acc=0.8600 val_loss=0.3900
    val_acc=0.8700 141 img/s', then the epoch's seconds (and the features computed once) when the row has them:
    a worker's history row does (``training/epochs.log``, Ray's worker log), the console's row read back from
    MLflow's metric histories does not."""
    line = (f"epoch {epoch}/{epochs} [{phase or 'train'}] train_loss={m.get('train_loss', 0):.4f} "
            f"train_acc={m.get('train_accuracy', 0):.4f} val_loss={m.get('val_loss', 0):.4f} "
            f"val_acc={m.get('val_accuracy', 0):.4f} {m.get('images_per_second', 0):.0f} img/s")
    if "epoch_seconds" in m:
        line += f" {m['epoch_seconds']:.1f} s"
    if m.get("feature_seconds"):
        line += f" (+{m['feature_seconds']:.1f} s computing features once)"
    return line
