"""models/heads.py: each head shape is what its name says (replace-fc is torchvision's own recipe), each
pooling has its width, and every head exports with torch.export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import build_model
from models.heads import HEAD_SHAPES, POOLS, AvgMaxPool, CatAvgMaxPool, HeadConfig, build_head


def test_replace_fc_is_the_torchvision_recipe() -> None:
    """replace-fc == torchvision resnet with `model.fc = nn.Linear(in_features, C)`."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet34(weights=None)
    reference.fc = nn.Linear(reference.fc.in_features, 4)
    ours = build_model("resnet34", 4, "replace-fc")
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    state |= {"head.fc.weight": reference.fc.weight, "head.fc.bias": reference.fc.bias}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_mlp_head_replaces_fc_with_a_new_head() -> None:
    model = build_model("resnet50", 10, "mlp", hidden_dim=256, dropout=0.3)
    names = [n for n, _ in model.head.named_children()]
    assert names == ["pool", "flatten", "fc1", "act", "drop", "fc2"]
    assert model.head.fc1.in_features == 2048 and model.head.fc1.out_features == 256
    assert model.head.fc2.out_features == 10 and model.head.drop.p == 0.3
    assert not hasattr(model.backbone, "fc")  # the old fc is gone, not left dangling


def test_catavgmax_doubles_head_input() -> None:
    model = build_model("resnet18", 5, "mlp:catavgmax")
    assert model.head.fc1.in_features == 1024
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_export_matches_eager(shape: str) -> None:
    model = build_model("resnet18", 3, shape).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_pools_have_their_widths_and_values() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    avg, top = x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(AvgMaxPool()(x), 0.5 * (avg + top))
    torch.testing.assert_close(CatAvgMaxPool()(x), torch.cat([avg, top], dim=1))
    for name, spec in POOLS.items():
        assert spec.factory()(x).shape == (2, 3 * spec.feature_multiplier, 1, 1), name


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
@pytest.mark.parametrize("in_features", [512, 2048])
def test_every_head_maps_a_feature_map_to_logits(shape: str, in_features: int) -> None:
    for pool in HEAD_SHAPES[shape].pools:
        head = build_head(shape, HeadConfig(in_features, 7, pool=pool, hidden_dim=32)).eval()
        assert head(torch.randn(3, in_features, 2, 2)).shape == (3, 7), (shape, pool)


def test_registering_a_shape_twice_is_refused() -> None:
    from models.heads import register_head

    with pytest.raises(ValueError, match="head shape 'mlp' is already registered"):
        register_head("mlp", "again")(lambda cfg: nn.Identity())
