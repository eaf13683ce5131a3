"""Train's controller logs each epoch to MLflow exactly once, from the history rank 0 reports: a local MLflow
store (SQLite, MLflow's own code) stands in for the server."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.tracking.epochs import HISTORY_KEY
from infra.training.epoch_log import EPOCHS_LOG, EpochLog, MlflowEpochs


def _row(epoch: int, phase: int = 1) -> dict[str, float]:
    return {"epoch": epoch, "phase": phase, "train_loss": 1.0 / epoch, "train_accuracy": 0.5, "val_loss": 0.9,
            "val_accuracy": 0.6, "images_per_second": 100.0, "epoch_seconds": 2.0, "feature_seconds": 0.0,
            "first_step_at": 1.0, "last_step_at": 2.0, "worker_started_at": 3.0}


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


def test_each_epoch_is_logged_once_whatever_the_history_repeats(run: tuple[str, str]) -> None:
    uri, run_id = run
    log = EpochLog(uri, run_id, "replace-fc+lp-ft", epochs=4, probe_epochs=2)
    log = pickle.loads(pickle.dumps(log))  # noqa: S301 - our own bytes, as Ray sends the callback to the controller
    callback = MlflowEpochs(log)
    callback.after_report(None, [{"epoch": 1, HISTORY_KEY: [_row(1)]}, {"epoch": 1}], None)
    callback.after_report(None, [{"epoch": 2, HISTORY_KEY: [_row(1), _row(2)]}], None)
    # a restarted worker group resumes from epoch 2's checkpoint and reports the same history again
    callback.after_report(None, [{"epoch": 3, HISTORY_KEY: [_row(1), _row(2), _row(3, 2)]}], None)
    # a new controller (the run resumed by a new driver) reads what MLflow already has
    assert EpochLog(uri, run_id, "replace-fc+lp-ft", 4, 2).sync([_row(1), _row(2), _row(3, 2), _row(4, 2)]) == 1

    client = MlflowClient(uri)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert steps == [1, 2, 3, 4]
    metrics = client.get_run(run_id).data.metrics
    assert not {"epoch", "first_step_at", "last_step_at", "worker_started_at"} & metrics.keys()
    text = Path(client.download_artifacts(run_id, EPOCHS_LOG)).read_text().splitlines()
    assert [line.split(" ")[1:3] for line in text] == [["1/4", "[probe]"], ["2/4", "[probe]"], ["3/4", "[finetune]"],
                                                        ["4/4", "[finetune]"]]


def test_a_tracking_failure_does_not_fail_training_and_is_caught_up(run: tuple[str, str], tmp_path: Path) -> None:
    uri, run_id = run
    broken = MlflowEpochs(EpochLog(f"sqlite:///{tmp_path / 'missing' / 'x.db'}", run_id, "replace-fc", 2, None))
    broken.after_report(None, [{HISTORY_KEY: [_row(1)]}], None)  # logs a warning, raises nothing
    assert EpochLog(uri, run_id, "replace-fc", 2, None).sync([_row(1), _row(2)]) == 2


def test_the_controller_imports_mlflow_while_epoch_1_trains_not_at_the_first_report() -> None:
    """Train calls ``after_worker_group_training_start`` in its controller once the workers run the training
    function: the MLflow client is imported then, on a thread, so the first report finds it loaded."""
    probe = ("import sys, threading; from infra.training.epoch_log import ImportMlflowDuringEpoch1; "
             "before = 'mlflow.tracking' in sys.modules; "
             "ImportMlflowDuringEpoch1().after_worker_group_training_start(None); "
             "[t.join(60) for t in threading.enumerate() if t.name == 'import-mlflow']; "
             "print(before, 'infra.tracking.runs' in sys.modules and 'mlflow.tracking' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_the_controllers_callbacks_do_not_import_torch() -> None:
    """Train's controller unpickles these callbacks, importing their module: the MLflow client must come only
    during epoch 1 (``ImportMlflowDuringEpoch1``), and the module needs none of the worker's torch code (the
    controller's torch comes from Ray's ``TorchConfig``, not from here)."""
    probe = "import sys, infra.training.epoch_log; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
