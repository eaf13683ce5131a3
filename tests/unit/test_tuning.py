"""The LR grid of `compare --tune lr` (the search itself runs on Ray Tune in tests/integration)."""

from __future__ import annotations

import itertools
import math

import pytest

from infra.training.tuning import Trial, lr_grid


def test_grid_is_log_spaced_over_three_decades_around_the_base_lr() -> None:
    grid = lr_grid(0.01, 6)
    assert len(grid) == 6 and grid == sorted(grid)
    assert math.log10(grid[-1] / grid[0]) == pytest.approx(3.0)
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert ratios == pytest.approx([10 ** 0.6] * 5)
    assert math.sqrt(grid[0] * grid[-1]) == pytest.approx(0.01)  # centred in log space
    assert lr_grid(0.05, 1) == [0.05]
    with pytest.raises(ValueError, match="tune trials must be >= 1"):
        lr_grid(0.01, 0)


def test_trial_without_epochs_never_wins() -> None:
    assert Trial(0.1, [], stopped_early=True).final_val_loss == math.inf
    assert Trial(0.1, [{"val_loss": 0.5}], stopped_early=False).final_val_loss == 0.5
