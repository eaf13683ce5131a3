"""Head strategies: a strategy name is ``<shape>[:<pool>][+<schedule>]``, e.g. ``mlp:catavgmax+full-ft``.

The head *shape* (what sits behind the trunk) and the training *schedule* (what trains, when) are separate
axes; ``parse_strategy`` validates a name against both registries and ``list_strategies`` returns the
curated named set that the docs, the CLI and the parametrized tests use.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.heads import HEAD_SHAPES, POOLS
from models.schedules import SCHEDULES

DEFAULT_SCHEDULE = "full-ft"


class StrategyError(ValueError):
    """An unknown or malformed strategy name; the message names the bad part and the allowed values."""


@dataclass(frozen=True)
class StrategySpec:
    shape: str
    pool: str = "avg"
    schedule: str = DEFAULT_SCHEDULE

    @property
    def name(self) -> str:
        """Canonical name: defaults are omitted, so ``mlp:avg+full-ft`` is ``mlp``."""
        name = self.shape
        if self.pool != HEAD_SHAPES[self.shape].default_pool:
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
    if shape not in HEAD_SHAPES:
        raise StrategyError(
            f"unknown strategy {name!r}: head shape {shape!r} is not one of {', '.join(HEAD_SHAPES)} "
            f"(named strategies: {', '.join(list_strategies())})"
        )
    pool = pool or HEAD_SHAPES[shape].default_pool
    if pool not in POOLS:
        raise StrategyError(f"unknown pooling {pool!r} in strategy {name!r}; allowed: {', '.join(POOLS)}")
    if pool not in HEAD_SHAPES[shape].pools:
        raise StrategyError(f"invalid combination {name!r}: head shape {shape!r} takes the poolings "
                            f"{', '.join(HEAD_SHAPES[shape].pools)}")
    if schedule not in SCHEDULES:
        raise StrategyError(
            f"unknown schedule {schedule!r} in strategy {name!r}; allowed: {', '.join(SCHEDULES)}"
        )
    return StrategySpec(shape, pool, schedule)


# The curated set: every shape, pooling variant and schedule at least once, not the whole cross product.
_CURATED: tuple[tuple[str, str], ...] = (
    ("replace-fc", "model.fc = Linear(in_features, C): a new linear layer in place of fc, everything fine-tuned"),
    ("mlp", "fc removed, an MLP head (Linear-ReLU-Dropout-Linear) attached behind the backbone, fine-tuned"),
    ("replace-fc+linear-probe", "frozen backbone (BN stats too), linear head on features computed once"),
    ("replace-fc+lp-ft", "linear probe on target BN statistics, then full fine-tuning (LP-FT, Kumar et al. 2022)"),
    ("mlp+lp-ft", "MLP head probed first, then full fine-tuning"),
    ("fastai+gradual", "fastai head (concat pool, BN, dropout), head first, then discriminative LRs"),
    ("conv1x1:avgmax", "1x1 conv classifier before avg+max pooling, fine-tuned"),
    ("replace-fc:max", "replace-fc behind global max pooling"),
    ("mlp:catavgmax", "MLP head on concatenated average+max pooled features (2x in_features)"),
)
DEMO_STRATEGIES: tuple[str, ...] = ("replace-fc", "mlp", "replace-fc+linear-probe", "replace-fc+lp-ft",
                                    "mlp+lp-ft", "fastai+gradual")


def all_strategies() -> list[str]:
    """Every valid canonical strategy name (curated ones first): the enum of the deployment forms."""
    names = [name for name, _ in _CURATED]
    for shape, head in HEAD_SHAPES.items():
        for pool in head.pools:
            for schedule in SCHEDULES:
                name = StrategySpec(shape, pool, schedule).name
                if name not in names:
                    names.append(name)
    return names


def list_strategies() -> dict[str, str]:
    """Curated strategy names -> one-line description; each name is valid for ``build_model``."""
    return dict(_CURATED)
