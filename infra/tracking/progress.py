"""Training progress as MLflow has it: for one Prefect flow run, each MLflow run that trains (the retrain
run, or every child of a comparison) with its latest epoch, the epoch budget and that epoch's metrics.

Train's controller logs every epoch to MLflow (``infra.training.epoch_log``), so the driver's console reads progress
from the same place the UI does, and none of Ray's worker output has to reach the terminal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.tracking.epochs import epoch_line

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second", "phase")


@dataclass(frozen=True)
class RunProgress:
    run_id: str
    label: str  # "replace-fc seed 1" for a comparison child, the strategy for a retrain
    epoch: int  # epochs logged so far
    epochs: int  # the budget (early stopping may end sooner)
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    metrics: dict[str, float] = field(default_factory=dict)  # the latest epoch's
    phase: str = ""  # the latest epoch's phase name (probe, finetune...)

    @property
    def finished(self) -> bool:
        return self.status != "RUNNING"

    def line(self) -> str:
        return epoch_line(self.epoch, self.epochs, self.phase, self.metrics)


def _phase_name(params: dict[str, str], phase: float | None) -> str:
    """The 'phase1' param reads 'finetune x2 epochs: ...': its first word names the phase."""
    if phase is None:
        return ""
    return params.get(f"phase{int(phase)}", "").split(" ", 1)[0]


class ProgressReader:
    """Polls MLflow for the training runs of one Prefect flow run (found by its ``prefect.flow_run_id``
    tag; a comparison's children by ``mlflow.parentRunId``)."""

    def __init__(self, tracking_uri: str, experiment: str, flow_run_id: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.experiment, self.flow_run_id = experiment, flow_run_id
        self._experiment_id: str | None = None

    def _search(self, filter_string: str) -> list[Run]:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                return []
            self._experiment_id = exp.experiment_id
        return list(self.client.search_runs([self._experiment_id], filter_string, max_results=200))

    def read(self) -> list[RunProgress]:
        """Every training run of the flow run, in start order; [] when MLflow cannot be reached."""
        try:
            tops = self._search(f"tags.`prefect.flow_run_id` = '{self.flow_run_id}'")
            runs = []
            for top in tops:
                if top.data.tags.get("headbench.kind") == "compare":
                    runs += self._search(f"tags.`mlflow.parentRunId` = '{top.info.run_id}'")
                else:
                    runs.append(top)
            return [self._progress(r) for r in sorted(runs, key=lambda r: r.info.start_time)]
        except MlflowException:
            return []

    def epochs_after(self, run_id: str, after: int) -> list[tuple[int, str]]:
        """The logged epochs after epoch ``after``, each with its line, from the metric histories. Callers
        remember the last epoch returned here, never an epoch count read earlier: an epoch logged between
        that read and this one would otherwise be returned again on the next call."""
        try:
            run = self.client.get_run(run_id)
            rows: dict[int, dict[str, float]] = {}
            for key in EPOCH_METRICS:
                for m in self.client.get_metric_history(run_id, key):
                    if m.step > after:
                        rows.setdefault(m.step, {})[key] = m.value
        except MlflowException:
            return []
        epochs = int(run.data.params.get("epochs", 0) or 0)
        return [(step, epoch_line(step, epochs, _phase_name(run.data.params, row.get("phase")), row))
                for step, row in sorted(rows.items()) if "train_loss" in row]

    def read_run(self, run_id: str) -> RunProgress | None:
        try:
            return self._progress(self.client.get_run(run_id))
        except MlflowException:
            return None

    def _progress(self, run: Run) -> RunProgress:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        epoch = len(self.client.get_metric_history(run.info.run_id, "train_loss")) if "train_loss" in metrics else 0
        strategy = tags.get("strategy", "")
        kind = tags.get("headbench.kind", "")
        label = {"compare-child": f"{strategy} seed {tags.get('seed', '?')}", "tune-strategy": f"tune lr {strategy}"
                 }.get(kind, strategy)
        return RunProgress(run.info.run_id, label, epoch, int(params.get("epochs", 0) or 0), run.info.status,
                           {k: metrics[k] for k in EPOCH_METRICS if k in metrics},
                           _phase_name(params, metrics.get("phase")))


@contextmanager
def epoch_lines(tracking_uri: str, run_id: str, emit: Callable[[str], object], every_s: float = 5.0
                ) -> Iterator[None]:
    """While the block runs, ``emit`` one line per epoch the run logs to MLflow (to a Prefect logger, say),
    so the flow run's logs hold the training curve without Ray's worker output."""
    reader = ProgressReader(tracking_uri, "", "")
    done = threading.Event()
    seen = 0

    def poll() -> None:
        nonlocal seen
        progress = reader.read_run(run_id)
        if progress is not None and progress.epoch > seen:
            for epoch, line in reader.epochs_after(run_id, seen):
                emit(line)
                seen = epoch

    def loop() -> None:
        while not done.wait(every_s):
            poll()

    thread = threading.Thread(target=loop, name=f"epochs-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=every_s + 5)
        poll()
