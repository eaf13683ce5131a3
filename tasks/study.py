"""A head-strategy study across data regimes: each grid cell is one `compare-heads` run; this module finds a
finished cell again (by the identity of its parameters, in MLflow), reads a cell's per-seed results back, and
writes the study's report: a leaderboard per cell, a heatmap of each strategy's gap to the best, and a
verdict per strategy ("wins or ties on N of M cells")."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.tracking.runs import Tracker
from tasks import TIMEOUT_S
from tasks.compare import ChildResult, Comparison, markdown_table, summarize

CELL_TAG = "headbench.study_cell"  # on a comparison's parent run: the identity of the cell it answers


def cell_key(params: dict[str, Any]) -> str:
    """What identifies a cell: every parameter that shapes its data, models and training (not how many children
    run at once), hashed."""
    shaping = {k: v for k, v in sorted(params.items()) if k not in ("parallel",)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StudyCell:
    label: str  # e.g. "fashion-mnist 0-1, 200 images, resnet18"
    run_id: str  # the comparison's MLflow parent run
    comparison: Comparison
    reused: bool  # found finished in MLflow, not trained again


@task(name="find-cell", timeout_seconds=TIMEOUT_S["summarize"], cache_policy=NO_CACHE)
def find_cell(tracking_uri: str, experiment: str, key: str) -> str | None:
    """The MLflow parent run of a finished comparison of this cell, if one exists."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{CELL_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


@task(name="read-cell", timeout_seconds=TIMEOUT_S["summarize"], cache_policy=NO_CACHE)
def read_cell(tracking_uri: str, run_id: str) -> list[ChildResult]:
    """A comparison's per-seed results, from its parent run's ``comparison/table.json``."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri).download_artifacts(run_id, "comparison/table.json", tmp)
        runs = json.loads(Path(path).read_text())["runs"]
    return [ChildResult(**(r | {"history": []})) for r in runs]


def verdicts(cells: list[StudyCell]) -> list[str]:
    """Per strategy: on how many cells it wins or ties (its paired interval against the winner includes 0)."""
    strategies = sorted({row.strategy for c in cells for row in c.comparison.rows})
    lines = []
    for strategy in strategies:
        good = [c.label for c in cells for row in c.comparison.rows
                if row.strategy == strategy and (row.versus_winner is None or not row.separated)]
        lines.append(f"{strategy} wins or ties on {len(good)} of {len(cells)} cells"
                     + (f" ({'; '.join(good)})" if good and len(good) < len(cells) else ""))
    return sorted(lines, key=lambda line: -int(line.split(" on ")[1].split(" ")[0]))


def gaps(cells: list[StudyCell]) -> tuple[list[str], list[list[float]]]:
    """(strategies, gap[strategy][cell]): mean test accuracy minus the cell's best (0 for its winner)."""
    strategies = sorted({row.strategy for c in cells for row in c.comparison.rows})
    table = []
    for strategy in strategies:
        table.append([next((row.accuracy.mean - c.comparison.rows[0].accuracy.mean for row in c.comparison.rows
                            if row.strategy == strategy), float("nan")) for c in cells])
    return strategies, table


def heatmap_png(cells: list[StudyCell], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies, table = gaps(cells)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cells), 1 + 0.5 * len(strategies)))
    image = ax.imshow(table, cmap="RdYlGn", vmin=min(-0.1, min(min(r) for r in table)), vmax=0.0, aspect="auto")
    ax.set_xticks(range(len(cells)), [c.label for c in cells], rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(strategies)), strategies, fontsize=8)
    for i, row in enumerate(table):
        for j, gap in enumerate(row):
            ax.text(j, i, f"{gap:+.3f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="test accuracy - the cell's best")
    ax.set_title("head strategies across data regimes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_markdown(cells: list[StudyCell]) -> str:
    parts = ["# Head-strategy study", "", "## Verdict", "", *[f"- {line}" for line in verdicts(cells)], ""]
    strategies, table = gaps(cells)
    parts += ["## Gap to each cell's best (mean test accuracy)", "",
              "| strategy | " + " | ".join(c.label for c in cells) + " |", "|---" * (len(cells) + 1) + "|"]
    parts += [f"| {s} | " + " | ".join(f"{g:+.4f}" for g in row) + " |" for s, row in zip(strategies, table,
                                                                                         strict=True)]
    for cell in cells:
        parts += ["", f"## {cell.label}", "", f"MLflow parent run `{cell.run_id}`"
                  + (" (finished earlier, reused)" if cell.reused else ""), "", markdown_table(cell.comparison)]
    return "\n".join(parts) + "\n"


@task(name="report-study", timeout_seconds=TIMEOUT_S["summarize"], cache_policy=NO_CACHE)
def report_study(cells: list[StudyCell], parent: Tracker) -> str:
    """The report, the heatmap and the verdicts on the study's MLflow parent run; returns the markdown."""
    markdown = report_markdown(cells)
    parent.log_text(markdown, "study/report.md")
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(heatmap_png(cells, Path(tmp) / "heatmap.png"), "study")
    lines = verdicts(cells)
    parent.set_tags({"verdict": lines[0], "mlflow.note.content": "; ".join(lines)})
    return markdown


__all__ = ["CELL_TAG", "StudyCell", "cell_key", "find_cell", "read_cell", "report_study", "summarize"]
