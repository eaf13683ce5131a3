"""The pipeline benchmark (`make bench`, `python -m bench`)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any


def steady_img_s(history: Sequence[dict[str, Any]]) -> float:
    """img/s of a run's steady state: the median over epochs 2.. (epoch 1 alone when there is no other), so
    warm-up (allocator, first-touch pages, cudnn autotuning) is left out on every side of a comparison."""
    return statistics.median([row["images_per_second"] for row in history[1:]] or [history[0]["images_per_second"]])


def epoch_walls(history: Sequence[dict[str, Any]]) -> list[float]:
    """Each epoch's wall time, first optimizer step to the next epoch's first step (the rows' ``first_step_at``,
    from the runner's step clock): its steps, validation, and what the runner does between epochs (a
    checkpoint, a report). The last epoch has no next one."""
    starts = [row.get("first_step_at", 0.0) for row in history]
    return [b - a for a, b in itertools.pairwise(starts) if a and b]


def steady_epoch_wall(history: Sequence[dict[str, Any]]) -> float | None:
    """The median wall time of epochs 2.. that have a next epoch (epoch 1 when it is the only one)."""
    walls = epoch_walls(history)
    return statistics.median(walls[1:] or walls) if walls else None
