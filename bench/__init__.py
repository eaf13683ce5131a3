"""The pipeline benchmark (`make bench`, `python -m bench`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def steady_img_s(history: Sequence[dict[str, Any]]) -> float:
    """img/s of a run's steady state: the median over epochs 2.. (epoch 1 alone when there is no other), so
    warm-up (allocator, first-touch pages, cudnn autotuning) is left out on every side of a comparison."""
    return statistics.median([row["images_per_second"] for row in history[1:]] or [history[0]["images_per_second"]])
