"""models/metrics.py: the confusion matrix and per-class precision/recall/F1 agree with hand counts and
with scikit-learn, undefined ratios are 0, not NaN; ECE agrees with torchmetrics and top-k with
scikit-learn on fixed arrays; per-class metric keys are valid and unique for any class name."""

from __future__ import annotations

import math
import re

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


def _fixed(n: int = 400, k: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, imperfectly calibrated probabilities (N, K) and targets (N,)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, k, (n,), generator=gen)
    logits = torch.randn(n, k, generator=gen) * 2.0
    logits[torch.arange(n), targets] += 1.5  # better than chance, and over-confident
    return torch.softmax(logits, dim=1), targets


def test_precision_recall_f1_agree_with_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    probs, targets = _fixed()
    predictions = probs.argmax(1)
    report = classification_report(targets, predictions, 7)
    precision, recall, f1, support = precision_recall_fscore_support(targets.numpy(), predictions.numpy(),
                                                                     labels=list(range(7)), zero_division=0)
    assert report.precision == pytest.approx(precision.tolist())
    assert report.recall == pytest.approx(recall.tolist())
    assert report.f1 == pytest.approx(f1.tolist())
    assert report.support == support.tolist()
    assert report.accuracy == pytest.approx(accuracy_score(targets.numpy(), predictions.numpy()))
    assert report.macro_f1 == pytest.approx(f1_score(targets.numpy(), predictions.numpy(), average="macro"))


@pytest.mark.parametrize("bins", [15, 10])
def test_ece_agrees_with_torchmetrics(bins: int) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    from models.metrics import calibration

    probs, targets = _fixed()
    cal = calibration(probs, targets, bins)
    reference = multiclass_calibration_error(probs, targets, num_classes=7, n_bins=bins, norm="l1")
    assert cal.ece == pytest.approx(float(reference), abs=1e-6)
    assert sum(cal.count) == len(targets) and len(cal.edges) == bins + 1
    assert cal.ece > 0.05
    perfect = torch.eye(3)[torch.tensor([0, 1, 2, 1])]  # one-hot and right: confidence 1, accuracy 1
    assert calibration(perfect, torch.tensor([0, 1, 2, 1])).ece == pytest.approx(0.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_agrees_with_sklearn(k: int) -> None:
    from sklearn.metrics import top_k_accuracy_score

    from models.metrics import top_k_accuracy

    probs, targets = _fixed(seed=3)
    assert top_k_accuracy(probs, targets, k) == pytest.approx(
        top_k_accuracy_score(targets.numpy(), probs.numpy(), k=k, labels=list(range(7))))
    assert top_k_accuracy(probs, targets, 7) == 1.0


def test_class_metric_keys_are_valid_unique_and_stable() -> None:
    from infra.tracking.runs import MAX_KEY_LEN, TrackingError, class_metric_keys

    names = ["Trouser", "T-shirt/top", "T-shirt_top", "猫", "犬", "chat noir", "x" * 300, "[/]", "a.b-c"]
    keys = class_metric_keys(names)
    assert len(set(keys)) == len(names)
    assert keys[0] == "Trouser" and keys[-1] == "a.b-c"  # clean names stay readable
    for key in keys:
        assert re.fullmatch(r"[0-9A-Za-z_\-. /]+", key) and len(f"test_precision_{key}") <= MAX_KEY_LEN
    assert class_metric_keys(["猫"]) == [keys[3]]  # the same key for a name whatever the other classes
    with pytest.raises(TrackingError, match="not unique"):
        class_metric_keys(["cat", "cat"])
