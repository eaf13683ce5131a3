"""Head strategies: a strategy name is ``<shape>[:<pool>][+<schedule>]``, e.g. ``mlp:catavgmax+full-ft``.

The head *shape* (what sits behind the trunk) and the training *schedule* (what trains, when) are separate
axes; ``parse_strategy`` validates a name against both registries and ``list_strategies`` returns the
curated named set that the docs, the CLI and the parametrized tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.heads import HEAD_SHAPES, POOLS


@dataclass(frozen=True)
class Schedule:
    name: str
    description: str
    freeze_backbone: bool  # backbone parameters get requires_grad=False at construction


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("full-ft", "everything trains from the first step", freeze_backbone=False),
    )
}

DEFAULT_POOL = "avg"
DEFAULT_SCHEDULE = "full-ft"


class StrategyError(ValueError):
    """An unknown or malformed strategy name; the message names the bad part and the allowed values."""


@dataclass(frozen=True)
class StrategySpec:
    shape: str
    pool: str = DEFAULT_POOL
    schedule: str = DEFAULT_SCHEDULE

    @property
    def name(self) -> str:
        """Canonical name: defaults are omitted, so ``mlp:avg+full-ft`` is ``mlp``."""
        name = self.shape
        if self.pool != DEFAULT_POOL:
            name += f":{self.pool}"
        if self.schedule != DEFAULT_SCHEDULE:
            name += f"+{self.schedule}"
        return name


def parse_strategy(name: str) -> StrategySpec:
    """Parse and validate ``<shape>[:<pool>][+<schedule>]``; raise StrategyError naming what is allowed."""
    text = name.strip()
    head, _, schedule = text.partition("+")
    shape, _, pool = head.partition(":")
    schedule = schedule or DEFAULT_SCHEDULE
    pool = pool or DEFAULT_POOL
    if shape not in HEAD_SHAPES:
        raise StrategyError(
            f"unknown strategy {name!r}: head shape {shape!r} is not one of {', '.join(HEAD_SHAPES)} "
            f"(named strategies: {', '.join(list_strategies())})"
        )
    if pool not in POOLS:
        raise StrategyError(f"unknown pooling {pool!r} in strategy {name!r}; allowed: {', '.join(POOLS)}")
    if schedule not in SCHEDULES:
        raise StrategyError(
            f"unknown schedule {schedule!r} in strategy {name!r}; allowed: {', '.join(SCHEDULES)}"
        )
    return StrategySpec(shape, pool, schedule)


# The curated set: every shape, pooling variant and schedule at least once, not the whole cross product.
_CURATED: tuple[tuple[str, str], ...] = (
    ("replace-fc", "origin recipe 1: new Linear(in_features, C) in place of fc, everything fine-tuned"),
    ("mlp", "origin recipe 2: fc removed, MLP head (Linear-ReLU-Dropout-Linear) attached, fine-tuned"),
    ("replace-fc:max", "replace-fc behind global max pooling"),
    ("replace-fc:avgmax", "replace-fc behind the mean of average and max pooling"),
    ("mlp:catavgmax", "MLP head on concatenated average+max pooled features (2x in_features)"),
)


def list_strategies() -> dict[str, str]:
    """Curated strategy names -> one-line description; each name is valid for ``build_model``."""
    return dict(_CURATED)
