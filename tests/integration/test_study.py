"""`headbench study` end to end on the session stack: one comparison per grid cell under one MLflow study run,
the report (per-cell leaderboards, heatmap, verdicts) there and as a Prefect artifact; run again, it finds
every cell finished and trains nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.stack.prefect_api import prefect_http
from infra.stack.ray_nodes import RayCluster
from tasks.study import CELL_TAG
from tests.integration.conftest import Stack

HEADBENCH = str(Path(sys.executable).parent / "headbench")
GRID = "fashion-mnist 0-1 60; fashion-mnist 0-2 60"
ARGS = ["study", "--grid", GRID, "--strategies", "replace-fc+linear-probe,replace-fc", "--seeds", "1",
        "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--test-limit", "40", "--workers", "1",
        "--cpus-per-worker", "1", "--precise-bn-batches", "2", "--seed", "11"]


def _children(client: MlflowClient, experiment_id: str) -> int:
    return len(client.search_runs([experiment_id], "tags.`headbench.kind` = 'compare-child'", max_results=1000))


@pytest.mark.training
def test_a_study_reports_every_cell_and_a_rerun_trains_nothing(stack: Stack, ray_cluster: RayCluster) -> None:
    first = subprocess.run([HEADBENCH, *ARGS], capture_output=True, text=True, timeout=900, check=False,
                           env=stack.cli_env(COLUMNS="200"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    parent_id = re.search(r"MLflow study run : \S+/runs/(\w+)", first.stdout)
    assert parent_id, first.stdout
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    parent = client.get_run(parent_id.group(1))
    assert parent.data.tags["headbench.kind"] == "study" and parent.data.params["grid"] == GRID
    cells = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(cells) == 2 and all(c.data.tags["headbench.kind"] == "compare" and c.data.tags[CELL_TAG]
                                   for c in cells)
    assert {c.data.params["classes"] for c in cells} == {"0-1", "0-2"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {"study/report.md", "study/heatmap.png"}
    report = Path(client.download_artifacts(parent.info.run_id, "study/report.md", str(stack.home))).read_text()
    for label in ("fashion-mnist 0-1, 60 images, resnet18", "fashion-mnist 0-2, 60 images, resnet18"):
        assert f"## {label}" in report and label in first.stdout
    assert report.count("wins or ties on") == 2 and "replace-fc+linear-probe" in report
    with prefect_http(stack.settings) as api:
        found = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["head-study"]}}}).json()
        every = api.post("/artifacts/filter", json={}).json()
    assert found and "Head-strategy study" in found[-1]["data"], [(a.get("key"), a.get("type")) for a in every]

    before = _children(client, parent.info.experiment_id)
    again = subprocess.run([HEADBENCH, *ARGS], capture_output=True, text=True, timeout=900, check=False,
                           env=stack.cli_env(COLUMNS="200"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("(read back, not trained again)") == 2, again.stdout
    assert _children(client, parent.info.experiment_id) == before  # not one child trained
