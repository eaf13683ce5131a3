"""Training schedules: what trains, when, at which learning rate. Orthogonal to the head shape.

A schedule expands into phases (``plan``); each phase says whether the backbone trains, the LR of every
parameter group, and whether the head trains from backbone features computed once (frozen phases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

# ResNet stages, input side first: the discriminative-LR groups of the `gradual` schedule.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stem", ("conv1", "bn1")),
    ("layer1", ("layer1",)),
    ("layer2", ("layer2",)),
    ("layer3", ("layer3",)),
    ("layer4", ("layer4",)),
)
DISCRIMINATIVE_SPREAD = 100.0  # fastai fine_tune: slice(lr/100, lr) from the stem to the head


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    train_backbone: bool
    lr_scale: float  # multiplies the base LR of the head group
    discriminative: bool  # per-stage LRs, geometric from lr/100 (stem) to lr (head)

    @property
    def frozen(self) -> bool:
        return not self.train_backbone


@dataclass(frozen=True)
class Schedule:
    """A named schedule: its phases as (name, train_backbone, lr_scale, discriminative); a two-phase schedule
    splits the epochs at ``probe_epochs``."""

    name: str
    description: str
    phases: tuple[tuple[str, bool, float, bool], ...]

    @property
    def freeze_backbone(self) -> bool:
        """The backbone starts frozen (requires_grad=False at construction)."""
        return not self.phases[0][1]


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("full-ft", "everything trains from the first step at the base LR",
                 (("finetune", True, 1.0, False),)),
        Schedule("linear-probe", "backbone frozen (BN statistics re-estimated once on the training images); only "
                 "the head trains, on backbone features computed once", (("probe", False, 1.0, False),)),
        # Fine-tuning at the base LR, not Kumar et al.'s LR/10: their fine-tuning runs for many epochs; in a short
        # budget LR/10 barely moves the backbone and LP-FT scores below its own probe (docs/quality.md).
        Schedule("lp-ft", "linear probe for the first epochs (cached features, target BN statistics), then full "
                 "fine-tuning at the base LR (LP-FT, Kumar et al., ICLR 2022)",
                 (("probe", False, 1.0, False), ("finetune", True, 1.0, False))),
        Schedule("gradual", "head only first, then everything with discriminative LRs from LR/100 (stem) to LR "
                 "(head) at half the base LR (fastai fine_tune)",
                 (("head", False, 1.0, False), ("unfrozen", True, 0.5, True))),
    )
}


def default_probe_epochs(epochs: int) -> int:
    return max(1, epochs // 2)


def plan(schedule: str, epochs: int, probe_epochs: int | None = None) -> list[Phase]:
    """Phases of ``schedule`` over ``epochs`` (two-phase schedules need >= 2 epochs)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    shape = SCHEDULES[schedule].phases
    if len(shape) == 1:
        return [Phase(shape[0][0], epochs, *shape[0][1:])]
    if epochs < 2:
        raise ValueError(f"schedule {schedule!r} has two phases and needs epochs >= 2, got {epochs}")
    k = probe_epochs or default_probe_epochs(epochs)
    if not 1 <= k < epochs:
        raise ValueError(f"probe_epochs {k} must be between 1 and epochs-1 ({epochs - 1}) for {schedule!r}")
    (first, *first_rest), (second, *second_rest) = shape
    return [Phase(first, k, *first_rest), Phase(second, epochs - k, *second_rest)]


def phase_at(phases: list[Phase], epoch: int) -> tuple[int, Phase, int]:
    """(phase index, phase, epoch within phase) for a 0-based global epoch."""
    start = 0
    for i, phase in enumerate(phases):
        if epoch < start + phase.epochs:
            return i, phase, epoch - start
        start += phase.epochs
    raise IndexError(f"epoch {epoch} is past the schedule ({start} epochs)")


def apply_phase(model: nn.Module, phase: Phase) -> None:
    """Set requires_grad for the phase: the head always trains, the backbone only when the phase says so."""
    model.backbone.requires_grad_(phase.train_backbone)
    model.head.requires_grad_(True)


def set_train_mode(model: nn.Module, phase: Phase) -> None:
    """model.train(), except a frozen backbone stays in eval mode so BatchNorm statistics do not move."""
    model.train()
    if phase.frozen:
        model.backbone.eval()


def param_groups(model: nn.Module, phase: Phase, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with a ``name`` and ``lr`` each (only parameters that train)."""
    head_lr = lr * phase.lr_scale
    groups: list[dict[str, Any]] = []
    if phase.train_backbone and phase.discriminative:
        n = len(STAGES)
        for i, (name, modules) in enumerate(STAGES):
            # geometric from head_lr / spread (stem) up to head_lr / spread**(1/(n)) (layer4)
            stage_lr = head_lr / DISCRIMINATIVE_SPREAD ** ((n - i) / n)
            params = [p for m in modules for p in getattr(model.backbone, m).parameters()]
            groups.append({"name": name, "params": params, "lr": stage_lr})
    elif phase.train_backbone:
        groups.append({"name": "backbone", "params": list(model.backbone.parameters()), "lr": head_lr})
    groups.append({"name": "head", "params": list(model.head.parameters()), "lr": head_lr})
    return groups


def describe_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-able summary of parameter groups for MLflow."""
    return [{"name": g["name"], "lr": g["lr"], "parameters": sum(p.numel() for p in g["params"])} for g in groups]


def describe_plan(model: nn.Module, schedule: str, epochs: int, probe_epochs: int | None, lr: float
                  ) -> list[dict[str, Any]]:
    """Every phase with its epochs, what trains and the LR of each group (for MLflow), without side effects."""
    out = []
    for i, phase in enumerate(plan(schedule, epochs, probe_epochs), start=1):
        groups = describe_groups(param_groups(model, phase, lr))
        out.append({"phase": i, "name": phase.name, "epochs": phase.epochs, "train_backbone": phase.train_backbone,
                    "bn_frozen": phase.frozen, "trainable_params": sum(g["parameters"] for g in groups),
                    "groups": groups})
    return out


def phase_params(phases: list[dict[str, Any]]) -> dict[str, str]:
    """One readable MLflow param per phase: 'probe x2 epochs, BN frozen: head@0.01 (2,052 params)'."""
    out = {}
    for p in phases:
        groups = ", ".join(f"{g['name']}@{g['lr']:.3g}" for g in p["groups"])
        frozen = ", BN frozen" if p["bn_frozen"] else ""
        out[f"phase{p['phase']}"] = (f"{p['name']} x{p['epochs']} epochs{frozen}: {groups} "
                                     f"({p['trainable_params']:,} params)")
    return out


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear from 1/warmup to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
