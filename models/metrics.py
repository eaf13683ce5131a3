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
