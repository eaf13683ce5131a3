"""models/strategies.py: strategy names parse and canonicalise, the curated set covers every shape, pooling
and schedule, bad names say what is allowed, and exactly the intended parameters train in the first phase."""

from __future__ import annotations

import pytest
import torch

from models import StrategyError, build_model, list_strategies, parse_strategy
from models.heads import HEAD_SHAPES, POOLS
from models.schedules import SCHEDULES, plan, set_train_mode

STRATEGIES = list(list_strategies())


def test_curated_set_covers_every_shape_pool_and_schedule() -> None:
    specs = [parse_strategy(name) for name in STRATEGIES]
    assert {s.shape for s in specs} == set(HEAD_SHAPES)
    assert {s.pool for s in specs} == set(POOLS)
    assert {s.schedule for s in specs} == set(SCHEDULES)
    assert all(description for description in list_strategies().values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exactly_the_intended_parameters_get_gradients(strategy: str) -> None:
    spec = parse_strategy(strategy)
    model = build_model("resnet18", 4, strategy)
    first = plan(spec.schedule, 4)[0]
    assert all(not p.requires_grad for p in model.backbone.parameters()) == first.frozen
    set_train_mode(model, first)
    running = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        should = name.startswith("head.") or not first.frozen
        assert (p.grad is not None) == should, name
    after = {k: v for k, v in model.backbone.state_dict().items() if "running" in k}
    unchanged = all(torch.equal(running[k], after[k]) for k in running)
    assert unchanged == first.frozen  # frozen phase: BN statistics do not move; training: they do


def test_invalid_combinations_name_what_is_allowed() -> None:
    with pytest.raises(StrategyError, match="head shape 'conv1x1' takes the poolings avg, max, avgmax"):
        parse_strategy("conv1x1:catavgmax")


def test_strategy_names_parse_and_canonicalise() -> None:
    assert parse_strategy("mlp").name == "mlp"
    assert parse_strategy("mlp:avg+full-ft").name == "mlp"
    spec = parse_strategy("replace-fc:max")
    assert (spec.shape, spec.pool, spec.schedule) == ("replace-fc", "max", "full-ft")
    for name in list_strategies():
        assert parse_strategy(name).name == name


@pytest.mark.parametrize("bad, fragment", [
    ("mlpp", "head shape 'mlpp' is not one of replace-fc, mlp"),
    ("mlp:median", "unknown pooling 'median'"),
    ("mlp+yolo", "unknown schedule 'yolo'"),
])
def test_bad_strategy_names_the_value_and_allowed(bad: str, fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment.replace("+", r"\+")):
        build_model("resnet18", 3, bad)
