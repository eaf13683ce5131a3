"""models/net.py: every arch x named strategy builds with the right in_features, output shape and gradients,
for any input size; the loaded backbone is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import ARCHS, ArchError, build_model, list_strategies, parse_strategy
from models.weights import save_state_dict

STRATEGIES = list(list_strategies())
EXPECTED_IN_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                        "resnet152": 2048}


# Every strategy on both block types (BasicBlock: resnet18; Bottleneck: resnet50); every other depth with the
# strategies of both head families. A head sees only the trunk's in_features, the same for every depth of a type.
ARCH_STRATEGY = ([(arch, s) for s in list_strategies() for arch in ("resnet18", "resnet50")]
                 + [(arch, s) for arch in ARCHS if arch not in ("resnet18", "resnet50") for s in ("replace-fc", "mlp")])


def test_the_pairs_cover_every_arch_and_every_strategy() -> None:
    assert {a for a, _ in ARCH_STRATEGY} == set(ARCHS)
    assert {s for _, s in ARCH_STRATEGY} == set(list_strategies())


@pytest.mark.parametrize(("arch", "strategy"), ARCH_STRATEGY)
def test_every_arch_and_strategy(arch: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, strategy)
    assert model.in_features == EXPECTED_IN_FEATURES[arch]
    assert "forward" not in model.__dict__  # no monkey-patched forward
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    frozen_start = parse_strategy(strategy).schedule != "full-ft"
    expected = {n for n, _ in model.named_parameters() if not frozen_start or n.startswith("head.")}
    assert trainable == with_grad == expected


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_any_input_size_from_32(size: int) -> None:
    model = build_model("resnet18", 3, "mlp").eval()
    assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


def test_unknown_arch_lists_allowed() -> None:
    with pytest.raises(ArchError, match="unknown arch 'resnet19'; allowed: resnet18, resnet34"):
        build_model("resnet19", 3, "mlp")


def test_num_classes_must_be_at_least_two() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("resnet18", 1, "mlp")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_shape_for_32_64_224(arch: str, strategy: str) -> None:
    model = build_model(arch, 6, strategy).eval()
    with torch.no_grad():
        for size in (32, 64, 224):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 6), size


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
