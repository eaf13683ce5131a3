"""What a Ray Train worker reports each epoch, as Train's controller reads it: the report's keys, which of a
history row's columns are MLflow metrics, and the epoch's log line.

Nothing here imports torch or ``models``: Train's controller imports this (through ``infra.epoch_log``, when
it unpickles the run's callbacks), and needs no more of the worker's code to log an epoch. (The controller
imports torch all the same: the trainer's backend config, Ray's ``TorchConfig``, which it unpickles, is
defined beside ``import torch``; docs/performance.md, *Start-up: CPU by process*.)
"""

from __future__ import annotations

HISTORY_KEY = "history"  # rank 0's report: its epoch row plus the whole history under this key
# wall clock, in the first row: the worker process started, had its imports (``infra.ray_worker.preload``),
# entered the training function, had its data and model
STARTUP_KEYS = frozenset({"worker_started_at", "worker_preloaded_at", "worker_entered_at", "worker_ready_at"})
NOT_METRICS = frozenset({"epoch", "first_step_at", "last_step_at"}) | STARTUP_KEYS  # history columns, not metrics


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """The MLflow metrics of a history row (no epoch number, step times or start-up clock)."""
    return {k: v for k, v in row.items() if k not in NOT_METRICS}


def epoch_line(row: dict[str, float], epochs: int, phase: str) -> str:
    """One epoch of ``training/epochs.log``, as rank 0 also prints it to Ray's worker log."""
    return (f"epoch {int(row['epoch'])}/{epochs} [{phase}] train_loss={row['train_loss']:.4f} "
            f"train_acc={row['train_accuracy']:.4f} val_loss={row['val_loss']:.4f} "
            f"val_acc={row['val_accuracy']:.4f} {row['images_per_second']:.0f} img/s {row['epoch_seconds']:.1f} s"
            + (f" (+{row['feature_seconds']:.1f} s computing features once)" if row.get("feature_seconds") else ""))
