"""Bad input against the real stack: one-line error, non-zero exit, nothing published, nothing logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from infra.s3 import s3_client
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


@pytest.mark.parametrize("case", ["missing-dir", "malformed-s3-uri", "empty-class", "classes-out-of-range",
                                  "workers-over-cpus", "strict-spread-over-nodes"])
def test_bad_input_fails_in_one_line_and_publishes_nothing(stack: Stack, tmp_path: Path, case: str) -> None:
    tree = _tree_with_empty_class(tmp_path / "tree")
    args, expected = {
        "missing-dir": (["--dataset", str(tmp_path / "nope")], f"unknown dataset '{tmp_path / 'nope'}'"),
        "malformed-s3-uri": (["--dataset", "s3://"], "not an S3 URI: 's3://'; expected s3://bucket/prefix"),
        "empty-class": (["--dataset", str(tree)], "class folder 'dog' in"),
        "classes-out-of-range": (["--dataset", str(tmp_path / "tree"), "--classes", "0-3"], None),
        "workers-over-cpus": (["--workers", "64", "--classes", "0-1", "--limit", "128", "--batch-size", "128",
                               "--image-size", "32"], "workers=64 x 1 CPU need 64 CPUs but the Ray cluster has"),
        # the stack's cluster has two nodes: no placement group of three workers on three nodes can ever exist
        "strict-spread-over-nodes": (["--workers", "3", "--cpus-per-worker", "1", "--placement-strategy",
                                      "STRICT_SPREAD", "--classes", "0-1", "--limit", "40", "--batch-size", "32",
                                      "--image-size", "32"],
                                     "with placement STRICT_SPREAD need 3 nodes of >= 1 CPUs; the cluster has 2"),
    }[case]
    if case == "classes-out-of-range":  # a valid tree, but only 2 classes
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tree / "dog" / "0.png")
        expected = "classes 2-3 out of range for a dataset with 2 classes; allowed: 0-1"
    before = _snapshot(stack)
    done = subprocess.run([HEADBENCH, "run", "--limit", "40", "--batch-size", "32", *args], capture_output=True,
                          text=True, timeout=600, env=stack.cli_env(), check=False)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    objects, runs = _snapshot(stack)
    assert objects == before[0]  # nothing published
    training = case in ("workers-over-cpus", "strict-spread-over-nodes")
    assert runs <= before[1] + (1 if training else 0)  # a training failure is a FAILED run
