"""models/metrics.py: the confusion matrix and per-class precision/recall/F1 agree with hand counts, and
undefined ratios are 0, not NaN."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import classification_report


def test_report_matches_hand_counts() -> None:
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    report = classification_report(targets, predictions, 3)
    assert report.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows: true, columns: predicted
    assert report.support == [3, 2, 1]
    assert report.precision == pytest.approx([1.0, 0.5, 0.5])
    assert report.recall == pytest.approx([2 / 3, 0.5, 1.0])
    f1 = [2 * p * r / (p + r) for p, r in zip(report.precision, report.recall, strict=True)]
    assert report.f1 == pytest.approx(f1)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.macro_f1 == pytest.approx(sum(f1) / 3)


def test_a_class_never_predicted_or_absent_scores_zero_not_nan() -> None:
    report = classification_report(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), 3)
    assert report.precision[1] == report.recall[1] == report.f1[1] == 0.0  # class 1: present, never predicted
    assert report.support[2] == 0 and report.f1[2] == 0.0  # class 2: absent
    assert not any(math.isnan(v) for v in report.precision + report.recall + report.f1)


def test_empty_input_is_accuracy_zero() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    report = classification_report(empty, empty, 2)
    assert report.confusion.sum() == 0 and report.accuracy == 0.0
