"""Backbone/head composition: a torchvision ResNet trunk plus a registered head (timm-style split).

``build_model(arch, num_classes, strategy, weights)`` is the single constructor. The trunk keeps
torchvision's module names (``backbone.conv1``, ``backbone.layer4.1.bn2``...), so torchvision state dicts
load into it key for key, and ``forward`` is a plain method (no monkey-patching).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from models.heads import HeadConfig, build_head
from models.strategies import SCHEDULES, StrategySpec, parse_strategy
from models.weights import WeightsError, load_into, read_state_dict

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TRUNK_MODULES: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
MIN_IMAGE_SIZE = 32  # five stride-2 stages: 32 px is the smallest input that leaves a 1x1 feature map


class ArchError(ValueError):
    """Unknown architecture; the message lists the allowed ones."""


class HeadNet(nn.Module):
    """ResNet trunk + classifier head: (N, 3, H, W) -> (N, F, H/32, W/32) -> (N, num_classes)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Module, *, arch: str, in_features: int,
                 num_classes: int, strategy: StrategySpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.in_features = in_features
        self.num_classes = num_classes
        self.strategy = strategy

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (N, 3, H, W) -> (N, F, ceil(H/32), ceil(W/32))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (N, F, h, w) -> (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ArchError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    return arch


def _torchvision_resnet(arch: str, weights: str | None) -> nn.Module:
    """A torchvision ResNet, with ImageNet weights fetched through torchvision's own API and cache."""
    # imported here, not at the top: torchvision's import pulls in torch._dynamo (seconds on a small CPU),
    # and Train's controller, which unpickles the worker module but builds no model, has no use for it
    import torchvision

    if weights is None:
        return torchvision.models.get_model(arch, weights=None)
    enum = torchvision.models.get_model_weights(arch)
    try:
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise WeightsError(f"unknown torchvision weights {weights!r} for {arch}; allowed: {names}") from None
    try:
        return torchvision.models.get_model(arch, weights=chosen)
    except OSError as exc:  # URLError is an OSError: no network, DNS failure, refused connection
        raise WeightsError(
            f"could not download torchvision weights {arch} {chosen.name} from {chosen.url} "
            f"(offline? {exc.__class__.__name__}: {exc})"
        ) from None


def is_torchvision_weights_name(weights: str) -> bool:
    """`DEFAULT` or an upper-case enum member name such as `IMAGENET1K_V1` (paths and URIs are not)."""
    return weights == "DEFAULT" or (weights.isupper() and "/" not in weights and "." not in weights)


def build_model(arch: str, num_classes: int, strategy: str, weights: str | Path | None = None, *,
                hidden_dim: int = HeadConfig.hidden_dim, dropout: float = HeadConfig.dropout,
                seed: int | None = None) -> HeadNet:
    """Build a ResNet with the given head strategy.

    weights: None or ``"none"`` (random init), a torchvision weights name (``DEFAULT``,
    ``IMAGENET1K_V1``...), or a local checkpoint path (safetensors, or a weights-only torch file) holding
    a headbench or torchvision state dict. The backbone loads strictly; a checkpoint head loads too when
    its shapes match this model's head (a warm start), otherwise the new head keeps its fresh init.

    seed: the random init, drawn from its own generator state (the caller's is left as it was). The trunk
    and the head are seeded apart, so every strategy on one seed starts from the same backbone and every
    strategy of one shape and pooling from the same head, whatever the schedule.
    """
    check_arch(arch)
    spec = parse_strategy(strategy)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for a classifier, got {num_classes}")
    weights_name = None if weights is None or str(weights).lower() == "none" else str(weights)
    tv_name = weights_name if weights_name and is_torchvision_weights_name(weights_name) else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        resnet = _torchvision_resnet(arch, tv_name)
        in_features: int = resnet.fc.in_features  # 512 for resnet18/34, 2048 for resnet50/101/152
        backbone = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in TRUNK_MODULES))
        if seed is not None:
            torch.manual_seed(seed + 1)  # the head's init: the same for a shape whatever came before it
        head = build_head(spec.shape, HeadConfig(in_features, num_classes, spec.pool, hidden_dim, dropout))
    model = HeadNet(backbone, head, arch=arch, in_features=in_features, num_classes=num_classes,
                    strategy=spec)
    if weights_name and tv_name is None:
        load_into(model, read_state_dict(Path(weights_name)), source=weights_name)
    if SCHEDULES[spec.schedule].freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
