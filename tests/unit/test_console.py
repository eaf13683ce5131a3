"""flows/console.py: the comparison table fits the terminal width and cuts strategy names only where they
stay unambiguous; epoch lines read like the worker's."""

from __future__ import annotations

import pytest
from rich.console import Console

from flows.console import comparison_table, shortest_unambiguous
from infra.tracking.epochs import epoch_line
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
