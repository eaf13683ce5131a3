"""Classification metrics on predicted and true labels (pure torch): confusion matrix, per-class
precision / recall / F1, accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassificationReport:
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = predicted class
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum() / self.confusion.sum().clamp(min=1))

    @property
    def macro_f1(self) -> float:
        return sum(self.f1) / len(self.f1)


def classification_report(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int
                          ) -> ClassificationReport:
    """Confusion matrix and per-class precision/recall/F1 (0 where undefined)."""
    flat = targets.long() * num_classes + predictions.long()
    confusion = torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return ClassificationReport(confusion=confusion, precision=precision.tolist(), recall=recall.tolist(),
                                f1=f1.tolist(), support=actual.long().tolist())


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017) and the bins behind it."""

    ece: float
    edges: list[float]  # bins + 1 edges over [0, 1]
    confidence: list[float]  # mean top-1 probability per bin (0 for empty bins)
    accuracy: list[float]  # share of correct top-1 predictions per bin (0 for empty bins)
    count: list[int]


def calibration(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> Calibration:
    """ECE = sum over bins of (n_b / N) * |accuracy_b - confidence_b|, bins (lo, hi] of the top-1 probability.

    probabilities: (N, K) rows summing to 1; targets: (N,) class indices."""
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == targets.long()).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bucketize(right=False) puts x in bin i when edges[i-1] < x <= edges[i]: bins are (lo, hi]
    index = (torch.bucketize(confidence, edges[1:-1], right=False)).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    safe = count.clamp(min=1)
    mean_conf, mean_acc = conf_sum / safe, acc_sum / safe
    total = max(int(count.sum().item()), 1)
    ece = float(((count / total) * (mean_acc - mean_conf).abs()).sum())
    return Calibration(ece, edges.tolist(), mean_conf.tolist(), mean_acc.tolist(), count.long().tolist())


def top_k_accuracy(probabilities: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of samples whose true class is among the k most probable ones."""
    if len(targets) == 0:
        return 0.0
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1).indices  # (N, k)
    return float((top == targets.long().view(-1, 1)).any(dim=1).double().mean())
