"""The `study` flow: head strategies across data regimes. Every cell of a grid (dataset x classes x images x
arch) is a `compare-heads` run at the same budget; a cell that finished before (the same parameters, found in
MLflow by their identity) is read back, not trained again. One report on the study's MLflow parent run and as
a Prefect artifact: a leaderboard per cell, a heatmap of each strategy's gap to the best, a verdict per
strategy.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.compare import compare_heads
from flows.params import StudyParams
from flows.retrain import prefect_context
from flows.stages import cancel_on_interrupt
from infra.settings import load_settings, require_servers
from infra.tracking.runs import run_url, start_run
from tasks import FLOW_TIMEOUT_S
from tasks.study import CELL_TAG, StudyCell, cell_key, find_cell, read_cell, report_study, summarize


class StudyResult(BaseModel):
    parent_run_id: str
    parent_run_url: str
    verdicts: list[str]
    cells: list[dict[str, Any]]  # label, MLflow run id, winner, reused
    markdown: str


@flow(name="study", flow_run_name="study", timeout_seconds=FLOW_TIMEOUT_S, log_prints=True)
def study(params: StudyParams = StudyParams()) -> StudyResult:  # noqa: B008 - pydantic default
    """Head strategies across data regimes: one comparison per grid cell, one report."""
    return cancel_on_interrupt(_study, params)  # type: ignore[return-value]  # CANCELLED on Ctrl-C/SIGTERM


def _study(params: StudyParams) -> StudyResult:
    from mlflow.tracking import MlflowClient

    from tasks.study import verdicts

    settings = load_settings()
    tracking_uri, _ = require_servers(settings)
    planned = params.cells()
    parent = start_run(tracking_uri, settings.experiment, flow_run.get_name() or "study",
                       tags={"headbench.kind": "study", **prefect_context()})
    cells: list[StudyCell] = []
    with parent.lifecycle():
        parent.log_params({"grid": params.grid, "archs": ",".join(params.archs),
                           "strategies": ",".join(params.strategies), "seeds": params.seeds, "epochs": params.epochs,
                           "image_size": params.image_size, "tune": params.tune, "weights": params.weights})
        for label, cell in planned:
            key = cell_key(cell.model_dump(mode="json"))
            found = find_cell(tracking_uri, settings.experiment, key)
            if found:
                print(f"{label}: finished before (MLflow run {found}), read back")
                run_id = found
            else:
                print(f"{label}: comparing {len(cell.strategies)} strategies x {cell.seeds} seeds")
                run_id = compare_heads(cell).parent_run_id
                MlflowClient(tracking_uri).set_tag(run_id, CELL_TAG, key)  # only a finished cell is ever found
            # under the study's run in MLflow's run list; its identity stays the tag above
            MlflowClient(tracking_uri).set_tag(run_id, "mlflow.parentRunId", parent.run_id)
            cells.append(StudyCell(label, run_id, summarize(read_cell(tracking_uri, run_id)), bool(found)))
        markdown = report_study(cells, parent)
    url, lines = run_url(tracking_uri, parent.run_id), verdicts(cells)
    create_markdown_artifact(markdown=markdown + f"\n[MLflow study run]({url})\n", key="head-study",
                             description=lines[0])
    return StudyResult(parent_run_id=parent.run_id, parent_run_url=url, verdicts=lines,
                       cells=[{"label": c.label, "run_id": c.run_id, "winner": c.comparison.winner,
                               "reused": c.reused} for c in cells], markdown=markdown)
