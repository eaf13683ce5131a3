"""Classifier heads: pooling + classifier modules that sit behind a ResNet trunk.

Every head takes the trunk's feature map ``(N, in_features, H/32, W/32)`` and returns logits
``(N, num_classes)``. Heads are registered by name (the public API of ``--strategy``), in the style of
torchvision's ``register_model`` and timm's ``create_classifier(pool_type=...)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.options import option

# --------------------------------------------------------------------------------------------- pooling


class AvgMaxPool(nn.Module):
    """Mean of global average and global max pooling: (N, C, H, W) -> (N, C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (nn.functional.adaptive_avg_pool2d(x, 1) + nn.functional.adaptive_max_pool2d(x, 1))


class CatAvgMaxPool(nn.Module):
    """Concatenated global average and max pooling (fastai 'concat pool'): (N, C, H, W) -> (N, 2C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_avg_pool2d(x, 1), nn.functional.adaptive_max_pool2d(x, 1)], 1)


@dataclass(frozen=True)
class PoolSpec:
    factory: Callable[[], nn.Module]
    feature_multiplier: int  # output channels = multiplier * input channels
    description: str


POOLS: dict[str, PoolSpec] = {
    "avg": PoolSpec(lambda: nn.AdaptiveAvgPool2d(1), 1, "global average pooling (torchvision default)"),
    "max": PoolSpec(lambda: nn.AdaptiveMaxPool2d(1), 1, "global max pooling"),
    "avgmax": PoolSpec(AvgMaxPool, 1, "mean of average and max pooling"),
    "catavgmax": PoolSpec(CatAvgMaxPool, 2, "concatenated average and max pooling (2x features)"),
}


# --------------------------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadConfig:
    """What every head factory needs; built by ``build_model`` from the strategy and the trunk."""

    in_features: int  # channels of the trunk's last feature map: 512 (resnet18/34) or 2048 (resnet50+)
    num_classes: int
    pool: str = "avg"
    # user options (``models.options``): the flows' parameters and the CLI are generated from these two
    hidden_dim: int = option(512, "hidden width of MLP heads", ge=8, le=8192)
    dropout: float = option(0.2, "dropout of MLP heads", ge=0.0, lt=1.0)


HeadFactory = Callable[[HeadConfig], nn.Module]


@dataclass(frozen=True)
class HeadShape:
    name: str
    factory: HeadFactory
    description: str
    default_pool: str = "avg"
    pools: tuple[str, ...] = tuple(POOLS)  # the poolings this shape accepts


HEAD_SHAPES: dict[str, HeadShape] = {}


def register_head(name: str, description: str, *, default_pool: str = "avg",
                  pools: tuple[str, ...] = tuple(POOLS)) -> Callable[[HeadFactory], HeadFactory]:
    """Register a head factory under ``name``; a duplicate name is a programming error."""

    def wrap(factory: HeadFactory) -> HeadFactory:
        if name in HEAD_SHAPES:
            raise ValueError(f"head shape {name!r} is already registered")
        HEAD_SHAPES[name] = HeadShape(name, factory, description, default_pool, pools)
        return factory

    return wrap


def _pool(cfg: HeadConfig) -> tuple[nn.Module, int]:
    spec = POOLS[cfg.pool]
    return spec.factory(), cfg.in_features * spec.feature_multiplier


@register_head("replace-fc", "model.fc = Linear(in_features, C) behind the pooled trunk")
def replace_fc_head(cfg: HeadConfig) -> nn.Module:
    pool, features = _pool(cfg)
    # Same names as torchvision's ResNet tail (avgpool, fc), so a replace-fc model is numerically the
    # torchvision model with its fc swapped: (N, C, h, w) -> pool -> (N, C) -> fc -> (N, classes).
    return nn.Sequential(
        OrderedDict(pool=pool, flatten=nn.Flatten(1), fc=nn.Linear(features, cfg.num_classes))
    )


@register_head("mlp", "fc removed, a new Flatten-Linear-ReLU-Dropout-Linear head attached")
def mlp_head(cfg: HeadConfig) -> nn.Module:
    pool, features = _pool(cfg)
    return nn.Sequential(
        OrderedDict(
            pool=pool,
            flatten=nn.Flatten(1),  # (N, F, 1, 1) -> (N, F)
            fc1=nn.Linear(features, cfg.hidden_dim),
            act=nn.ReLU(inplace=True),
            drop=nn.Dropout(cfg.dropout),
            fc2=nn.Linear(cfg.hidden_dim, cfg.num_classes),
        )
    )


@register_head("fastai", "fastai create_head: concat pool-BN-Dropout-Linear(2F, 512)-ReLU-BN-Dropout-Linear(512, C)",
               default_pool="catavgmax")
def fastai_head(cfg: HeadConfig) -> nn.Module:
    pool, features = _pool(cfg)
    # fastai's defaults: ps=0.5 split as p/2 before the first Linear and p before the last
    return nn.Sequential(
        OrderedDict(
            pool=pool,
            flatten=nn.Flatten(1),
            bn1=nn.BatchNorm1d(features),
            drop1=nn.Dropout(0.25),
            fc1=nn.Linear(features, 512, bias=False),
            act=nn.ReLU(inplace=True),
            bn2=nn.BatchNorm1d(512),
            drop2=nn.Dropout(0.5),
            fc2=nn.Linear(512, cfg.num_classes, bias=False),
        )
    )


class ConvClassifier(nn.Module):
    """1x1 convolution over the feature map, then pooling of the class maps (timm ``use_conv``):
    (N, F, h, w) -> conv -> (N, C, h, w) -> pool -> (N, C)."""

    def __init__(self, in_features: int, num_classes: int, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, num_classes, kernel_size=1)
        self.pool = pool
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.conv(x)))


@register_head("conv1x1", "1x1 convolution classifier on the feature map, pooled afterwards (timm use_conv)",
               pools=("avg", "max", "avgmax"))
def conv1x1_head(cfg: HeadConfig) -> nn.Module:
    return ConvClassifier(cfg.in_features, cfg.num_classes, POOLS[cfg.pool].factory())


def build_head(shape: str, cfg: HeadConfig) -> nn.Module:
    return HEAD_SHAPES[shape].factory(cfg)
