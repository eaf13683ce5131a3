"""The PNG figures a run logs to MLflow (matplotlib, Agg backend): confusion matrix, learning curves,
reliability diagram and a grid of misclassified test images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import Calibration, ClassificationReport


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def confusion_png(report: ClassificationReport, class_names: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
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
    return _save(fig, path)


def learning_curves_png(history: list[dict[str, float]], path: Path) -> Path:
    plt = _pyplot()
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
    return _save(fig, path)


def reliability_png(cal: Calibration, path: Path) -> Path:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and bin counts."""
    plt = _pyplot()
    edges = np.array(cal.edges)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = np.array(cal.count) > 0
    fig, (ax, count_ax) = plt.subplots(2, 1, figsize=(5, 5.5), height_ratios=[3, 1], sharex=True)
    ax.bar(centres[filled], np.array(cal.accuracy)[filled], width=width * 0.9, label="accuracy", color="#4c72b0")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres[filled], np.array(cal.confidence)[filled], "o", color="#dd8452", label="mean confidence")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability: ECE {cal.ece:.4f} "
           f"({len(cal.count)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    count_ax.bar(centres, cal.count, width=width * 0.9, color="#55a868")
    count_ax.set(xlabel="confidence (top-1 probability)", ylabel="images")
    return _save(fig, path)


def misclassified_png(images: np.ndarray, true: Sequence[int], predicted: Sequence[int], confidence: Sequence[float],
                      class_names: list[str], path: Path, columns: int = 6) -> Path:
    """A grid of misclassified images (uint8 (N, C, S, S)), each titled 'true -> predicted (p)'."""
    plt = _pyplot()
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images, true, predicted, confidence, strict=False):
        shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        ax.imshow(shown, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"{class_names[t][:14]}\n-> {class_names[p][:14]} ({c:.2f})", fontsize=7)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    return _save(fig, path)
