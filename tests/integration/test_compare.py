"""`headbench compare --tune lr` against the real stack and Ray cluster, once: the MLflow parent, its
per-strategy tuning runs and their trials, the seed children trained at the tuned LR, artifacts, Prefect."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.stack.prefect_api import prefect_http
from infra.stack.ray_nodes import RayCluster
from tests.integration.conftest import Stack

HEADBENCH = str(Path(sys.executable).parent / "headbench")
STRATEGIES = ["replace-fc+linear-probe", "mlp"]


@pytest.fixture(scope="module")
def compare_run(stack: Stack, ray_cluster: RayCluster) -> tuple[str, str, str]:
    """One comparison of two strategies x two seeds, each strategy's LR first searched on Ray Tune (ASHA):
    (stdout, parent run id, stderr)."""
    args = [HEADBENCH, "compare", "--strategies", ",".join(STRATEGIES), "--seeds", "2", "--tune", "lr",
            "--tune-trials", "2", "--classes", "0-1", "--limit", "60", "--test-limit", "40", "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--workers", "1", "--cpus-per-worker", "1", "--lr", "0.01",
            "--seed", "5"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False,
                          env=stack.cli_env(COLUMNS="250"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    parent_id = re.search(r"MLflow parent run : \S+/runs/(\w+)", done.stdout)
    assert parent_id, done.stdout
    return done.stdout, parent_id.group(1), done.stderr


def _client(stack: Stack) -> MlflowClient:
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    return MlflowClient(uri)


def test_the_console_has_no_warning_and_no_traceback(compare_run: tuple[str, str, str]) -> None:
    stdout, _, stderr = compare_run
    noisy = [line for line in (stdout + stderr).splitlines()
             if re.search(r"\bwarn(ing)?\b|Traceback|Timeout of", line, re.I)]
    assert not noisy, noisy


def test_parent_children_artifacts_and_prefect(stack: Stack, compare_run: tuple[str, str, str],
                                               tmp_path: Path) -> None:
    stdout, parent_id, _ = compare_run
    assert re.search(r"winner (replace-fc\+linear-probe|mlp) by [+-]\d\.\d{4} test accuracy", stdout)
    client = _client(stack)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["headbench.kind"] == "compare"
    assert parent.data.params["strategies"] == ",".join(STRATEGIES) and parent.data.params["seeds"] == "2"
    assert parent.data.tags["winner"] in STRATEGIES
    assert parent.data.tags["mlflow.note.content"] == parent.data.tags["verdict"]  # the run's description
    kind = client.get_experiment(parent.info.experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"  # MLflow's UI opens it as model training, not GenAI

    below = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    children = [r for r in below if r.data.tags["headbench.kind"] == "compare-child"]
    assert sorted((c.data.tags["strategy"], c.data.tags["seed"]) for c in children) == sorted(
        (s, str(seed)) for s in STRATEGIES for seed in (5, 6))
    shared = {k for k in children[0].data.params if not k.startswith("phase")}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {k for k in child.data.params if not k.startswith("phase")} == shared  # aligned in the UI
        assert {"test_accuracy", "test_macro_f1", "val_accuracy", "train_loss"} <= child.data.metrics.keys()
        assert child.data.params["classes"] == "0-1" and child.data.params["train_size"] == "54"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
    probe = [c for c in children if c.data.tags["strategy"] == "replace-fc+linear-probe"]
    assert all(c.data.params["trainable_params"] == "1026" for c in probe)  # Linear(512, 2) only
    assert "BN frozen" in probe[0].data.params["phase1"]

    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert listed == {"comparison/table.json", "comparison/table.md", "comparison/comparison.png"}
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison/table.json",
                                                      str(tmp_path))).read_text())
    assert sorted(row["strategy"] for row in table["rows"]) == sorted(STRATEGIES)
    assert all(row["runs"] == 2 for row in table["rows"])

    with prefect_http(stack.settings) as api:
        artifacts = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [
            "head-comparison", "head-comparison-mlflow"]}}}).json()
    kinds = {a["key"]: a["type"] for a in artifacts}
    assert kinds["head-comparison"] == "table"
    assert kinds["head-comparison-mlflow"] in ("link", "markdown")  # Prefect 3 stores links as markdown
    # this comparison's link among those of every compare the stack has run
    assert any(parent.info.run_id in a["data"] for a in artifacts if a["key"] == "head-comparison-mlflow")


def test_lr_search_per_strategy_and_seeds_at_the_tuned_lr(stack: Stack, compare_run: tuple[str, str, str]) -> None:
    """--tune lr: per strategy a Ray Tune search (ASHA) nested parent -> strategy -> trial in MLflow, then the
    seeds trained at the chosen LR."""
    client = _client(stack)
    parent = client.get_run(compare_run[1])
    assert parent.data.params["tune"] == "lr"
    below = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    tuned = {r.data.tags["strategy"]: r for r in below if r.data.tags["headbench.kind"] == "tune-strategy"}
    seeds: dict[str, list] = {}
    for r in below:
        if r.data.tags["headbench.kind"] == "compare-child":
            seeds.setdefault(r.data.tags["strategy"], []).append(r)
    assert sorted(tuned) == sorted(seeds) == sorted(STRATEGIES)
    grid = [0.01 * 10 ** (-1.5 + 3 * i) for i in range(2)]  # both ends of 3 decades around --lr
    for name, run in tuned.items():
        assert run.info.status == "FINISHED"
        trials = client.search_runs([parent.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        lrs = sorted(float(t.data.params["lr"]) for t in trials)
        assert lrs == pytest.approx(grid)
        assert sum(t.data.tags["best"] == "true" for t in trials) == 1
        for trial in trials:
            steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_loss")]
            assert steps == ([1] if trial.data.tags["stopped_by_asha"] == "true" else [1, 2])
        best = float(run.data.metrics["best_lr"])
        assert best == pytest.approx(next(float(t.data.params["lr"]) for t in trials if t.data.tags["best"] == "true"))
        assert len(seeds[name]) == 2
        assert all(float(c.data.params["lr"]) == pytest.approx(best) for c in seeds[name])  # at the tuned LR
