"""flows/console.py: the comparison table fits the terminal width and cuts strategy names only where they
stay unambiguous; epoch lines read like the worker's and print once each."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from flows.console import LiveProgress, comparison_table, shortest_unambiguous
from infra.tracking.epochs import epoch_line
from infra.tracking.progress import ProgressReader, epoch_lines
from models.strategies import DEMO_STRATEGIES


def _records(names: list[str]) -> list[dict[str, object]]:
    return [{"strategy": n, "runs": 3, "test acc [95% CI]": "0.8947 [0.8901, 0.8993]",
             "vs winner [paired 95% CI]": "-0.0173 [-0.0202, -0.0145]", "macro-F1 [95% CI]": "0.8940 [0.8890, 0.8990]",
             "lr": "0.01", "train s": 123.4, "trainable params": 11177538, "img/s": 140.2} for n in names]


def _render(names: list[str], width: int) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False)
    console.print(comparison_table(_records(names), width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_demo_table_fits_and_keeps_every_strategy_name_whole(width: int) -> None:
    names = list(DEMO_STRATEGIES)
    lines = _render(names, width)
    assert all(len(line.rstrip()) <= width for line in lines)
    body = lines[2:]  # title, header
    assert [line.split()[0] for line in body] == names
    assert "test acc [95% CI]" in lines[1] and "vs winner [paired 95% CI]" in lines[1]
    assert ("trainable params" in lines[1]) == (width >= 160)  # lower-priority columns only where they fit


def test_a_narrow_terminal_cuts_names_only_to_an_unambiguous_prefix() -> None:
    names = ["replace-fc", "replace-fc+lp-ft", "replace-fc+linear-probe", "mlp"]
    lines = _render(names, 40)
    cut = [line.split()[0] for line in lines[2:]]
    assert len(set(cut)) == len(names) and all(len(line.rstrip()) <= 40 for line in lines)
    # "replace-fc+lp…" and "replace-fc+li…" differ; one character less, both read "replace-fc+l…"
    assert shortest_unambiguous(["replace-fc+lp-ft", "replace-fc+linear-probe"]) == len("replace-fc+lp") + 1
    assert shortest_unambiguous(["a", "bb"]) == 2  # nothing to cut


def test_epoch_line_has_the_phase_and_the_curve() -> None:
    line = epoch_line(2, 5, "finetune", {"train_loss": 0.41, "train_accuracy": 0.86, "val_loss": 0.39,
                                         "val_accuracy": 0.87, "images_per_second": 141.2})
    assert line == ("epoch 2/5 [finetune] train_loss=0.4100 train_acc=0.8600 val_loss=0.3900 val_acc=0.8700 "
                    "141 img/s")
    # a worker's history row has its seconds too: the same line, for training/epochs.log and Ray's worker log
    row = {"epoch": 2.0, "train_loss": 0.41, "train_accuracy": 0.86, "val_loss": 0.39, "val_accuracy": 0.87,
           "images_per_second": 141.2, "epoch_seconds": 3.25, "feature_seconds": 1.5}
    assert epoch_line(2, 5, "probe", row) == ("epoch 2/5 [probe] train_loss=0.4100 train_acc=0.8600 val_loss=0.3900 "
                                              "val_acc=0.8700 141 img/s 3.2 s (+1.5 s computing features once)")


def _log_epoch(client: MlflowClient, run_id: str, epoch: int) -> None:
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"):
        client.log_metric(run_id, key, 1.0 / epoch, step=epoch)


def test_an_epoch_logged_between_reading_the_count_and_the_lines_prints_once(tmp_path: Path) -> None:
    """The console reads a run's epoch count, then its lines: an epoch that MLflow gets in between is printed
    with the lines, and the next count (which now includes it) must not print it again. A local MLflow store
    (SQLite, MLflow's own code) stands in for the server."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", (tmp_path / "a").as_uri())).info.run_id
    client.log_param(run_id, "epochs", 3)
    _log_epoch(client, run_id, 1)
    out = io.StringIO()
    live = LiveProgress(Console(file=out, force_terminal=False), uri, "t")
    live.reader = ProgressReader(uri, "t", "")
    counted = live.reader.read_run(run_id)
    assert counted is not None and counted.epoch == 1
    _log_epoch(client, run_id, 2)  # epoch 2 reaches MLflow after the count, before the lines are read
    live._show(counted, many=False)
    for _ in range(2):
        again = live.reader.read_run(run_id)
        assert again is not None and again.epoch == 2
        live._show(again, many=False)
    _log_epoch(client, run_id, 3)
    live._show(live.reader.read_run(run_id), many=False)  # type: ignore[arg-type]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]

    # the flow run's log (tasks.train): the same reader, the same rule
    emitted: list[str] = []
    with epoch_lines(uri, run_id, emitted.append, every_s=0.01):
        pass
    assert [line.split()[1] for line in emitted] == ["1/3", "2/3", "3/3"]
