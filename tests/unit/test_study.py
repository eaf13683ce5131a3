"""The study's grid syntax, cell identity and report, on made-up comparison results (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.params import StudyParams, parse_grid
from tasks.compare import ChildResult, summarize
from tasks.study import StudyCell, cell_key, gaps, heatmap_png, report_markdown, verdicts


def _cell(label: str, scores: dict[str, list[float]]) -> StudyCell:
    results = [ChildResult(strategy, seed, f"{strategy}-{seed}", acc, acc, 1.0, 10, 100.0, [], 0.01)
               for strategy, accs in scores.items() for seed, acc in enumerate(accs)]
    return StudyCell(label, f"run-{label}", summarize(results), reused=False)


def test_the_grid_is_cells_of_dataset_classes_and_images_times_archs() -> None:
    params = StudyParams(grid="fashion-mnist 0-1 200; https://host/a.tar.gz all all", archs=["resnet18", "resnet34"])
    cells = params.cells()
    assert [(c.dataset, c.classes, c.limit, c.arch) for _, c in cells] == [
        ("fashion-mnist", "0-1", 200, "resnet18"), ("fashion-mnist", "0-1", 200, "resnet34"),
        ("https://host/a.tar.gz", None, None, "resnet18"), ("https://host/a.tar.gz", None, None, "resnet34")]
    assert cells[0][0] == "fashion-mnist 0-1, 200 images, resnet18"
    assert all(c.strategies == params.strategies and c.epochs == params.epochs for _, c in cells)
    for bad in ("fashion-mnist 0-1", "fashion-mnist 0-1 many", " ; "):
        with pytest.raises(ValueError, match="grid"):
            parse_grid(bad)
    with pytest.raises(ValidationError, match="expected 'DATASET CLASSES LIMIT'"):
        StudyParams(grid="cifar10")


def test_a_cell_is_identified_by_what_shapes_it_not_by_how_many_run_at_once() -> None:
    [(_, cell)] = StudyParams(grid="fashion-mnist 0-1 200").cells()
    dump = cell.model_dump(mode="json")
    assert cell_key(dump) == cell_key(dump | {"parallel": 4})
    assert cell_key(dump) != cell_key(dump | {"epochs": 3}) != cell_key(dump | {"seed": 1})


def test_verdicts_count_wins_and_ties_and_the_heatmap_shows_gaps(tmp_path: Path) -> None:
    few = _cell("few", {"replace-fc": [0.90, 0.91, 0.92], "mlp": [0.80, 0.81, 0.82]})  # replace-fc separated
    many = _cell("many", {"replace-fc": [0.95, 0.90, 0.93], "mlp": [0.95, 0.92, 0.93]})  # mlp wins, replace-fc ties
    lines = verdicts([few, many])
    assert lines == ["replace-fc wins or ties on 2 of 2 cells", "mlp wins or ties on 1 of 2 cells (many)"]
    strategies, table = gaps([few, many])
    assert strategies == ["mlp", "replace-fc"]
    assert table[1][0] == 0.0 and table[0][0] == pytest.approx(-0.10)
    assert table[0][1] == 0.0 and table[1][1] == pytest.approx(0.9267 - 0.9333, abs=1e-3)
    text = report_markdown([few, many])
    assert "## few" in text and "## many" in text and "| mlp | -0.1000 | +0.0000 |" in text
    assert heatmap_png([few, many], tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
