"""models/schedules.py: the registry drives plan(); phases split the epochs, freeze and unfreeze the backbone
and set each group's learning rate as the schedule says."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.schedules import SCHEDULES, apply_phase, describe_plan, param_groups, phase_at, phase_params, plan


def test_second_phase_unfreezes_with_the_scheduled_learning_rates() -> None:
    model = build_model("resnet18", 4, "fastai+gradual")
    head_phase, unfrozen = plan("gradual", 4)
    assert [g["name"] for g in param_groups(model, head_phase, 0.01)] == ["head"]
    apply_phase(model, unfrozen)
    groups = param_groups(model, unfrozen, 0.01)
    assert [g["name"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(0.005) and lrs[0] == pytest.approx(0.005 / 100)
    assert all(p.requires_grad for p in model.parameters())
    probe, finetune = plan("lp-ft", 5, probe_epochs=2)
    assert (probe.epochs, finetune.epochs, finetune.lr_scale) == (2, 3, 1.0)


def test_the_registry_drives_plan() -> None:
    for name, schedule in SCHEDULES.items():
        phases = plan(name, 4, probe_epochs=1 if len(schedule.phases) == 2 else None)
        assert [p.name for p in phases] == [s[0] for s in schedule.phases]
        assert [p.train_backbone for p in phases] == [s[1] for s in schedule.phases]
        assert sum(p.epochs for p in phases) == 4
        assert schedule.freeze_backbone == phases[0].frozen
    assert [p.epochs for p in plan("lp-ft", 5)] == [2, 3]  # the default split: half, rounded down


def test_bad_plans_name_the_value_and_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'yolo'; allowed: full-ft, linear-probe, lp-ft, gradual"):
        plan("yolo", 3)
    with pytest.raises(ValueError, match="needs epochs >= 2"):
        plan("lp-ft", 1)
    with pytest.raises(ValueError, match="probe_epochs 3 must be between 1 and epochs-1"):
        plan("gradual", 3, probe_epochs=3)


def test_phase_at_walks_the_global_epochs() -> None:
    phases = plan("lp-ft", 5, probe_epochs=2)
    assert [phase_at(phases, e)[::2] for e in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(IndexError, match="epoch 5 is past the schedule"):
        phase_at(phases, 5)


def test_frozen_phase_keeps_bn_in_eval_mode() -> None:
    from models.schedules import set_train_mode

    model = build_model("resnet18", 3, "replace-fc+linear-probe")
    probe, finetune = plan("lp-ft", 2)
    set_train_mode(model, probe)
    assert not model.backbone.training and model.head.training
    set_train_mode(model, finetune)
    assert model.backbone.training


def test_described_plan_counts_what_trains_without_touching_the_model() -> None:
    model = build_model("resnet18", 3, "replace-fc+lp-ft")
    before = [p.requires_grad for p in model.parameters()]
    phases = describe_plan(model, "lp-ft", 4, 1, 0.1)
    assert [p.requires_grad for p in model.parameters()] == before
    head = sum(p.numel() for p in model.head.parameters())
    assert phases[0]["trainable_params"] == head == 512 * 3 + 3 and phases[0]["bn_frozen"]
    assert phases[1]["trainable_params"] == sum(p.numel() for p in model.parameters())
    text = phase_params(phases)
    assert text["phase1"] == f"probe x1 epochs, BN frozen: head@0.1 ({head:,} params)"
    assert text["phase2"].startswith("finetune x3 epochs: backbone@0.1, head@0.1")
    assert torch.is_grad_enabled()
