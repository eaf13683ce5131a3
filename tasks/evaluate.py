"""Evaluation task: test accuracy, macro-F1, calibration (ECE), top-5, per-class precision/recall/F1,
inference latency and throughput -> MLflow metrics, with the per-class table and the figures as artifacts."""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from infra.tracking.plots import confusion_png, learning_curves_png, misclassified_png, reliability_png
from infra.tracking.runs import Tracker, class_metric_keys
from models.data import ArrayDataset, ArraySplit
from models.loop import evaluate
from models.metrics import Calibration, ClassificationReport, calibration, classification_report, top_k_accuracy
from models.predict import inference_speed
from tasks import TIMEOUT_S

ECE_BINS = 15
TOP_K = 5  # top-5 accuracy is reported when there are more than 5 classes
MISCLASSIFIED_SHOWN = 24


@dataclass(frozen=True)
class TestMetrics:
    accuracy: float
    macro_f1: float
    loss: float
    ece: float
    top5: float | None  # None with <= 5 classes, where it is always 1
    report: ClassificationReport
    calibration: Calibration
    predictions: torch.Tensor  # (N,)
    confidence: torch.Tensor  # (N,) top-1 probability
    inference: dict[str, float] = field(default_factory=dict)  # latency p50/p95 at batch 1, img/s at 64

    def as_dict(self) -> dict[str, float]:
        out = {"test_accuracy": self.accuracy, "test_macro_f1": self.macro_f1, "test_loss": self.loss,
               "test_ece": self.ece}
        return out | ({"test_top5_accuracy": self.top5} if self.top5 is not None else {})


def evaluate_split(model: nn.Module, split: ArraySplit, num_classes: int, batch_size: int = 256) -> TestMetrics:
    """Plain single-process evaluation on the CPU (also used to score a champion on this run's split)."""
    loader = torch.utils.data.DataLoader(ArrayDataset(split), batch_size=batch_size, shuffle=False)
    result = evaluate(model, nn.CrossEntropyLoss(), loader, torch.device("cpu"))
    report = classification_report(result.targets, result.predictions, num_classes)
    cal = calibration(result.probabilities, result.targets, ECE_BINS)
    top5 = top_k_accuracy(result.probabilities, result.targets, TOP_K) if num_classes > TOP_K else None
    return TestMetrics(accuracy=result.accuracy, macro_f1=report.macro_f1, loss=result.loss, ece=cal.ece, top5=top5,
                       report=report, calibration=cal, predictions=result.predictions,
                       confidence=result.probabilities.max(dim=1).values if len(result.targets) else torch.empty(0))


def per_class_csv(metrics: TestMetrics, class_names: list[str], path: Path) -> Path:
    rep = metrics.report
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "metric_key", "precision", "recall", "f1", "support"])
        for i, (name, key) in enumerate(zip(class_names, class_metric_keys(class_names), strict=True)):
            writer.writerow([name, key, f"{rep.precision[i]:.6f}", f"{rep.recall[i]:.6f}", f"{rep.f1[i]:.6f}",
                             rep.support[i]])
    return path


@task(name="evaluate", timeout_seconds=TIMEOUT_S["evaluate"], cache_policy=NO_CACHE)
def evaluate_model(model: nn.Module, test: ArraySplit, class_names: list[str], tracker: Tracker) -> TestMetrics:
    """Score the trained model on the held-out test split; log metrics, the per-class table and figures."""
    metrics = evaluate_split(model, test, len(class_names))
    rep = metrics.report
    per_class: dict[str, float] = {}
    for i, key in enumerate(class_metric_keys(class_names)):
        per_class |= {f"test_precision_{key}": rep.precision[i], f"test_recall_{key}": rep.recall[i],
                      f"test_f1_{key}": rep.f1[i]}
    speed = inference_speed(model, torch.from_numpy(test.images))
    tracker.log_metrics(metrics.as_dict() | per_class | speed)
    cal = metrics.calibration
    tracker.log_dict({"classes": class_names, "confusion": rep.confusion.tolist(), "precision": rep.precision,
                      "recall": rep.recall, "f1": rep.f1, "support": rep.support, "accuracy": metrics.accuracy,
                      "macro_f1": metrics.macro_f1, "top5_accuracy": metrics.top5, "ece": cal.ece,
                      "calibration": {"bins": len(cal.count), "edges": cal.edges, "confidence": cal.confidence,
                                      "accuracy": cal.accuracy, "count": cal.count},
                      "inference": speed | {"device": "cpu", "threads": torch.get_num_threads()}},
                     "evaluation/report.json")
    wrong = (metrics.predictions != torch.from_numpy(test.labels)).nonzero().flatten()[:MISCLASSIFIED_SHOWN]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for artifact in (
            confusion_png(rep, class_names, folder / "confusion_matrix.png", f"test accuracy {metrics.accuracy:.3f}"),
            reliability_png(cal, folder / "reliability_diagram.png"),
            misclassified_png(test.images[wrong.numpy()], test.labels[wrong.numpy()].tolist(),
                              metrics.predictions[wrong].tolist(), metrics.confidence[wrong].tolist(), class_names,
                              folder / "misclassified.png"),
            per_class_csv(metrics, class_names, folder / "per_class.csv"),
        ):
            tracker.log_artifact(artifact, "evaluation")
    return replace(metrics, inference=speed)


def log_learning_curves(history: list[dict[str, float]], tracker: Tracker) -> None:
    """Per-epoch history as JSON and a loss/accuracy plot, next to the per-epoch metrics."""
    tracker.log_dict(history, "training/history.json")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(learning_curves_png(history, Path(tmp) / "learning_curves.png"), "training")
