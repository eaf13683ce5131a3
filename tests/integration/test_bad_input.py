"""Bad input against the real stack: one-line error, exit 2, nothing published, nothing logged. The cases are
independent commands, so they run at once."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from infra.storage.s3 import s3_client
from tests.integration.conftest import Stack

HEADBENCH = str(Path(sys.executable).parent / "headbench")


def _snapshot(stack: Stack) -> tuple[int, int]:
    client = s3_client(stack.settings)
    objects = client.list_objects_v2(Bucket=stack.settings.model_bucket).get("KeyCount", 0)
    uri = stack.settings.mlflow_tracking_uri
    assert uri
    runs = len(MlflowClient(uri).search_runs(experiment_ids=[e.experiment_id for e in
                                                              MlflowClient(uri).search_experiments()]))
    return objects, runs


def _tree_with_empty_class(root: Path) -> Path:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(root / "cat" / f"{i}.png")
    return root


CASES = ["missing-dir", "malformed-s3-uri", "empty-class", "classes-out-of-range", "workers-over-cpus",
         "strict-spread-over-nodes"]
TRAINING = ("workers-over-cpus", "strict-spread-over-nodes")  # refused once Ray is joined: a FAILED run each


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    expected: str


@pytest.fixture(scope="module")
def bad_runs(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], tuple[int, int],
                                                                             tuple[int, int]]:
    """Every case's `headbench run`, all at once (independent commands; the stack's state is read before the
    first starts and after the last ends): {case: outcome}, (S3 objects, MLflow runs) before and after."""
    tmp = tmp_path_factory.mktemp("bad-input")
    tree = _tree_with_empty_class(tmp / "tree")
    valid = _tree_with_empty_class(tmp / "valid")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(valid / "dog" / "0.png")  # 2 classes, none empty
    cases = {
        "missing-dir": (["--dataset", str(tmp / "nope")], f"unknown dataset '{tmp / 'nope'}'"),
        "malformed-s3-uri": (["--dataset", "s3://"], "not an S3 URI: 's3://'; expected s3://bucket/prefix"),
        "empty-class": (["--dataset", str(tree)], "class folder 'dog' in"),
        "classes-out-of-range": (["--dataset", str(valid), "--classes", "0-3"],
                                 "classes 2-3 out of range for a dataset with 2 classes; allowed: 0-1"),
        "workers-over-cpus": (["--workers", "64", "--classes", "0-1", "--limit", "128", "--batch-size", "128",
                               "--image-size", "32"], "workers=64 x 1 CPU need 64 CPUs but the Ray cluster has"),
        # the stack's cluster has two nodes: no placement group of three workers on three nodes can ever exist
        "strict-spread-over-nodes": (["--workers", "3", "--cpus-per-worker", "1", "--placement-strategy",
                                      "STRICT_SPREAD", "--classes", "0-1", "--limit", "40", "--batch-size", "32",
                                      "--image-size", "32"],
                                     "with placement STRICT_SPREAD need 3 nodes of >= 1 CPUs; the cluster has 2"),
    }
    before = _snapshot(stack)
    procs = {case: subprocess.Popen([HEADBENCH, "run", "--limit", "40", "--batch-size", "32", *args],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.cli_env())
             for case, (args, _) in cases.items()}
    outcomes = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        outcomes[case] = Outcome(proc.returncode, out, err, cases[case][1])
    return outcomes, before, _snapshot(stack)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line(bad_runs: tuple[dict[str, Outcome], Any, Any], case: str) -> None:
    done = bad_runs[0][case]
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and done.expected in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_bad_input_publishes_nothing(bad_runs: tuple[dict[str, Outcome], tuple[int, int], tuple[int, int]]) -> None:
    _, (objects_before, runs_before), (objects_after, runs_after) = bad_runs
    assert objects_after == objects_before  # nothing published
    assert runs_after <= runs_before + len(TRAINING)  # a training failure is a FAILED run, nothing else a run
