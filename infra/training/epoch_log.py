"""Per-epoch MLflow logging of a Ray Train run, done by Train's controller, not by a training worker.

Rank 0 reports its whole history with every epoch (a few hundred bytes a row); ``MlflowEpochs``, a Ray Train
``UserCallback``, runs in the controller after every worker has reported and the epoch's checkpoint is
persisted, and logs the epochs MLflow does not have yet, plus ``training/epochs.log``. The workers therefore
never import the MLflow client (35 MB of USS in a process that has torch and ray.train already), and a
tracking hiccup cannot fail or restart the training: the controller exists once per run, on the driver's
node. Logging by history, not by the latest row, makes every path exactly-once without bookkeeping in the
worker: a restarted worker group resumes from its checkpoint and reports the checkpointed epochs again, and a
restarted run (Ctrl-C, then ``--resume``) starts a new controller that reads MLflow's own record first.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ray.train import UserCallback

from infra.tracking.epochs import HISTORY_KEY, epoch_line, epoch_metrics
from infra.training.ray_private import WorkerGroupCallback

logger = logging.getLogger(__name__)

EPOCHS_LOG = "training/epochs.log"


class EpochLog:
    """Brings one MLflow run's per-epoch metrics (step = epoch) and ``training/epochs.log`` up to a history.

    Picklable as long as it has not talked to MLflow (Ray sends it to the controller before that)."""

    def __init__(self, tracking_uri: str, run_id: str, strategy: str, epochs: int, probe_epochs: int | None) -> None:
        from models import parse_strategy  # on the driver: Train's controller only unpickles this
        from models.schedules import plan

        self.tracking_uri, self.run_id, self.epochs = tracking_uri, run_id, epochs
        self.phases = [p.name for p in plan(parse_strategy(strategy).schedule, epochs, probe_epochs)]
        self._tracker: Any = None
        self._logged: set[int] = set()

    def phase_name(self, row: dict[str, float]) -> str:
        return self.phases[int(row["phase"]) - 1]  # the loop numbers its phases from 1

    def sync(self, history: Sequence[dict[str, float]]) -> int:
        """Log the rows MLflow lacks (each epoch once) and rewrite the epoch log; returns how many were new."""
        if self._tracker is None:
            from infra.tracking.runs import Tracker  # the MLflow client, first used in the controller

            self._tracker = Tracker(self.tracking_uri, self.run_id)
            # epochs an earlier attempt or an earlier driver already logged (a resumed run, a rerun epoch from
            # the same seed repeats what was logged)
            self._logged = {m.step for m in self._tracker.client.get_metric_history(self.run_id, "train_loss")}
        new = [row for row in history if int(row["epoch"]) not in self._logged]
        for row in new:
            self._tracker.log_metrics(epoch_metrics(row), step=int(row["epoch"]))
            self._logged.add(int(row["epoch"]))
        if new:
            lines = [epoch_line(int(row["epoch"]), self.epochs, self.phase_name(row), row) for row in history]
            self._tracker.log_text("\n".join(lines) + "\n", EPOCHS_LOG)
        return len(new)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_tracker": None, "_logged": set()}


class ImportMlflowDuringEpoch1(WorkerGroupCallback):
    """Imports the MLflow client in Train's controller on a thread once the workers train their first epoch.

    The controller's first MLflow call comes with the first report, and its import (0.5 CPU-s) then ran beside
    epoch 2's steps, taking 0.15 of a core from the training worker; imported as the controller starts, it
    held the GIL while the controller started the worker group, and start-up took longer. During epoch 1 the
    controller only polls its workers, and epoch 1 already carries the run's one-time costs (the first steps).
    A Train internal callback (passed through ``RunConfig.callbacks``, as Ray provides for), hence the pin on
    ray in pyproject.toml."""

    def after_worker_group_training_start(self, worker_group: Any) -> None:
        threading.Thread(target=importlib.import_module, args=("infra.tracking.runs",), name="import-mlflow",
                         daemon=True).start()


class MlflowEpochs(UserCallback):
    """Train's controller logs each reported epoch once its checkpoint is persisted (``after_report`` runs
    after every worker reported and the checkpoint was uploaded), so that MLflow never shows an epoch that
    a resumed run would train again. A failed MLflow call costs only the live view: the next epoch's sync,
    and the driver's own sync after ``fit``, log what is missing."""

    def __init__(self, log: EpochLog) -> None:
        self.log = log

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        history = metrics[0].get(HISTORY_KEY) if metrics else None
        if history is None:
            return
        try:
            self.log.sync(history)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not fail the training run
            logger.warning("MLflow epoch logging failed, retried at the next epoch: %s", exc)
