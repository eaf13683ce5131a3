"""Pure PyTorch: ResNet backbones, the head-strategy registry, data tensors and loop functions.

Nothing here imports prefect, mlflow, ray or boto3.
"""

from models.net import (
    ARCHS,
    MIN_IMAGE_SIZE,
    ArchError,
    HeadNet,
    build_model,
    check_arch,
    trainable_parameters,
)
from models.strategies import StrategyError, StrategySpec, list_strategies, parse_strategy
from models.weights import WeightsError

__all__ = [
    "ARCHS",
    "MIN_IMAGE_SIZE",
    "ArchError",
    "HeadNet",
    "StrategyError",
    "StrategySpec",
    "WeightsError",
    "build_model",
    "check_arch",
    "list_strategies",
    "parse_strategy",
    "trainable_parameters",
]
