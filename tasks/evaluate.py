"""Evaluation task: test accuracy, per-class precision/recall/F1 and a confusion-matrix plot -> MLflow."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from infra.tracking import Tracker, metric_key
from models.data import ArrayDataset, ArraySplit
from models.loop import evaluate
from models.metrics import ClassificationReport, classification_report


@dataclass(frozen=True)
class TestMetrics:
    accuracy: float
    macro_f1: float
    loss: float
    report: ClassificationReport

    def as_dict(self) -> dict[str, float]:
        return {"test_accuracy": self.accuracy, "test_macro_f1": self.macro_f1, "test_loss": self.loss}


def evaluate_split(model: nn.Module, split: ArraySplit, num_classes: int, batch_size: int = 256) -> TestMetrics:
    """Plain single-process evaluation on the CPU (also used to check a published model)."""
    loader = torch.utils.data.DataLoader(ArrayDataset(split), batch_size=batch_size, shuffle=False)
    result = evaluate(model, nn.CrossEntropyLoss(), loader, torch.device("cpu"))
    report = classification_report(result.targets, result.predictions, num_classes)
    return TestMetrics(accuracy=result.accuracy, macro_f1=report.macro_f1, loss=result.loss, report=report)


def confusion_png(report: ClassificationReport, class_names: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = report.confusion.numpy()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(model: nn.Module, test: ArraySplit, class_names: list[str], tracker: Tracker) -> TestMetrics:
    """Score the trained model on the held-out test split and log metrics and plots to MLflow."""
    metrics = evaluate_split(model, test, len(class_names))
    rep = metrics.report
    per_class: dict[str, float] = {}
    for i, name in enumerate(class_names):
        key = metric_key(name)
        per_class |= {f"test_precision_{key}": rep.precision[i], f"test_recall_{key}": rep.recall[i],
                      f"test_f1_{key}": rep.f1[i]}
    tracker.log_metrics(metrics.as_dict() | per_class)
    tracker.log_dict({"classes": class_names, "confusion": rep.confusion.tolist(), "precision": rep.precision,
                      "recall": rep.recall, "f1": rep.f1, "support": rep.support,
                      "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1}, "evaluation/report.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = confusion_png(rep, class_names, Path(tmp) / "confusion_matrix.png",
                            f"test accuracy {metrics.accuracy:.3f}")
        tracker.log_artifact(png, "evaluation")
    return metrics


def learning_curves_png(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        acc_ax.plot(epochs, [r[f"{split}_accuracy"] for r in history], marker="o", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_learning_curves(history: list[dict[str, float]], tracker: Tracker) -> None:
    """Per-epoch history as JSON and a loss/accuracy plot, next to the per-epoch metrics."""
    tracker.log_dict(history, "training/history.json")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(learning_curves_png(history, Path(tmp) / "learning_curves.png"), "training")
