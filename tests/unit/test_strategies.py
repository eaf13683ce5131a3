"""Head strategies x schedules: shapes, what trains, frozen BatchNorm, loaded weights kept, round trips,
export, cached features, parameter groups, and the comparison statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import StrategyError, build_model, list_strategies, parse_strategy
from models.data import normalize_batch
from models.heads import HEAD_SHAPES, POOLS
from models.loop import extract_features, feature_input, train_one_epoch
from models.schedules import SCHEDULES, apply_phase, param_groups, plan, set_train_mode
from models.weights import save_state_dict

STRATEGIES = list(list_strategies())


def test_curated_set_covers_every_shape_pool_and_schedule() -> None:
    specs = [parse_strategy(name) for name in STRATEGIES]
    assert {s.shape for s in specs} == set(HEAD_SHAPES)
    assert {s.pool for s in specs} == set(POOLS)
    assert {s.schedule for s in specs} == set(SCHEDULES)
    assert all(description for description in list_strategies().values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_shape_for_32_64_224(arch: str, strategy: str) -> None:
    model = build_model(arch, 6, strategy).eval()
    with torch.no_grad():
        for size in (32, 64, 224):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 6), size


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


def test_invalid_combinations_name_what_is_allowed() -> None:
    with pytest.raises(StrategyError, match="head shape 'conv1x1' takes the poolings avg, max, avgmax"):
        parse_strategy("conv1x1:catavgmax")
    with pytest.raises(ValueError, match="needs epochs >= 2"):
        plan("lp-ft", 1)
    with pytest.raises(ValueError, match="probe_epochs 3 must be between 1 and epochs-1"):
        plan("gradual", 3, probe_epochs=3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loaded_backbone_is_kept_and_state_dict_round_trips(strategy: str, tmp_path: Path) -> None:
    source = build_model("resnet18", 5, "replace-fc")
    path = tmp_path / "source.safetensors"
    save_state_dict(source, path)
    model = build_model("resnet18", 3, strategy, path)
    for key, value in source.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(model.state_dict()[key], value), key
    save_state_dict(model, tmp_path / "copy.safetensors")
    again = build_model("resnet18", 3, strategy, tmp_path / "copy.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), model.eval()(x))


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_export_matches_eager(shape: str) -> None:
    model = build_model("resnet18", 3, shape).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_cached_features_give_the_same_head_logits() -> None:
    model = build_model("resnet18", 4, "mlp:catavgmax+linear-probe").eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    cached = extract_features(model.backbone, images, torch.device("cpu"), batch_size=3)
    assert cached.shape == (10, 512, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.head(cached), model(normalize_batch(images)), rtol=1e-5, atol=1e-5)


def test_head_trains_on_cached_features_and_backbone_stays_put() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "replace-fc+linear-probe")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    features = extract_features(model.backbone, images, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=8)
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.01)
    losses = [train_one_epoch(model.head, torch.nn.CrossEntropyLoss(), optimizer, loader, torch.device("cpu"),
                              prepare=feature_input).loss for _ in range(15)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_precise_bn_replaces_lagging_running_stats_by_exact_means() -> None:
    from models.loop import recompute_bn_stats

    torch.manual_seed(0)
    model = build_model("resnet18", 3, "mlp")
    images = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(24, dtype=torch.long)),
                                         batch_size=8)
    with torch.no_grad():
        model.backbone.bn1.running_mean.fill_(123.0)  # a stale statistic from another domain
    used = recompute_bn_stats(model, loader, torch.device("cpu"), max_batches=2)
    assert used == 2 and model.backbone.bn1.momentum == 0.1  # momentum restored
    # bn1 sees conv1's output: its exact mean over the two batches, per channel
    with torch.no_grad():
        x = normalize_batch(images[:16])
        expected = model.backbone.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.backbone.bn1.running_mean, expected, rtol=1e-4, atol=1e-4)
