"""models/: every arch x named strategy builds, has the right in_features, output shape and gradients."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from models import (
    ARCHS,
    ArchError,
    StrategyError,
    WeightsError,
    build_model,
    list_strategies,
    parse_strategy,
)
from models.weights import save_state_dict

EXPECTED_IN_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                        "resnet152": 2048}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", list(list_strategies()))
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


def test_unknown_arch_lists_allowed() -> None:
    with pytest.raises(ArchError, match="unknown arch 'resnet19'; allowed: resnet18, resnet34"):
        build_model("resnet19", 3, "mlp")


def test_num_classes_must_be_at_least_two() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("resnet18", 1, "mlp")


def test_published_weights_round_trip_and_warm_start(tmp_path: Path) -> None:
    source = build_model("resnet18", 5, "mlp")
    path = tmp_path / "model.safetensors"
    save_state_dict(source, path)
    # same head shape: backbone and head both load (a warm start)
    same = build_model("resnet18", 5, "mlp", path)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    # a different task: backbone loads, the new head keeps its fresh init
    other = build_model("resnet18", 3, "replace-fc", path)
    for k, v in source.state_dict().items():
        if k.startswith("backbone."):
            torch.testing.assert_close(other.state_dict()[k], v)
    assert other.head.fc.out_features == 3


def test_torchvision_state_dict_loads_into_backbone(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 4, "mlp", path)
    for k, v in reference.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[f"backbone.{k}"], v)


def test_weights_for_another_arch_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.safetensors"
    save_state_dict(build_model("resnet18", 5, "mlp"), path)
    with pytest.raises(WeightsError, match="do not fit a resnet50 backbone"):
        build_model("resnet50", 5, "mlp", path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": _Exploit(marker)}))
    with pytest.raises(WeightsError, match="refused by the safe loader"):
        build_model("resnet18", 3, "mlp", path)
    assert not marker.exists()


def test_corrupt_and_missing_weights_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        build_model("resnet18", 3, "mlp", bad)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("resnet18", 3, "mlp", tmp_path / "nope.safetensors")
    tensors = tmp_path / "partial.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tensors)
    with pytest.raises(WeightsError, match="missing"):
        build_model("resnet18", 3, "mlp", tensors)


def test_unknown_torchvision_weights_name_lists_allowed() -> None:
    with pytest.raises(WeightsError, match="unknown torchvision weights 'IMAGENET9K' for resnet18; allowed: "
                       "DEFAULT, IMAGENET1K_V1"):
        build_model("resnet18", 3, "mlp", "IMAGENET9K")


def test_torchvision_weights_download_or_clear_offline_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Real torchvision download path: works online; offline it fails with a one-line message naming the URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        model = build_model("resnet18", 3, "mlp", "IMAGENET1K_V1")
    except WeightsError as exc:
        assert weights.url in str(exc) and "offline?" in str(exc)
        assert "\n" not in str(exc)
    else:
        expected = weights.get_state_dict(progress=False)
        torch.testing.assert_close(model.state_dict()["backbone.conv1.weight"], expected["conv1.weight"])
