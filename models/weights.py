"""Safe checkpoint reading and strict loading into a HeadNet.

Only safetensors or ``torch.load(weights_only=True)`` are used: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the integrity check of a published model)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WeightsError(ValueError):
    """A weights spec that cannot be used: missing, unsafe, corrupt, or for another architecture."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, a weights-only torch file, or a directory holding
    ``model.safetensors`` (a published headbench model)."""
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; allowed: none, a torchvision "
                           "weights name (DEFAULT, IMAGENET1K_V1...), a local path or an s3:// URI")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"weights file {str(path)!r} is not a valid safetensors file: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise WeightsError(f"weights file {str(path)!r} refused by the safe loader (weights_only=True): "
                           f"{first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


KEY_FORMATS = ("torchvision", "headbench")  # how a published state dict names its keys


def torchvision_layout(model: nn.Module) -> bool:
    """True when the model *is* a torchvision ResNet with ``fc`` reassigned: a ``replace-fc`` head behind
    average pooling. Its state dict then uses torchvision's names (``conv1.weight``... ``fc.bias``) and loads
    into ``torchvision.models.<arch>(num_classes=C)`` with ``strict=True``; other heads keep
    ``backbone.*`` / ``head.*`` names, which torchvision has no module for."""
    strategy = getattr(model, "strategy", None)
    return strategy is not None and strategy.shape == "replace-fc" and strategy.pool == "avg"


def publishable_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The unwrapped model's tensors (no DDP ``module.`` prefix), contiguous on the CPU, and their key
    format: torchvision's names where the model is torchvision's (see ``torchvision_layout``)."""
    inner = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    if not torchvision_layout(inner):
        return state, "headbench"
    # backbone.layer1.0.conv1.weight -> layer1.0.conv1.weight; head.fc.weight -> fc.weight (avg pool and
    # flatten hold no tensors, so this is every key)
    return {k.removeprefix("backbone.").removeprefix("head."): v for k, v in state.items()}, "torchvision"


def save_state_dict(model: nn.Module, path: Path) -> str:
    """Save the model's state dict as safetensors; returns its key format (``KEY_FORMATS``)."""
    state, key_format = publishable_state_dict(model)
    # no header metadata: safetensors writes it from a hash map in a per-process order, so two keys would
    # make the same weights hash differently (the manifest records the key format instead)
    save_file(state, path)
    return key_format


def load_exact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a published state dict in either key format with ``strict=True``: every key, every shape."""
    model.load_state_dict(headbench_keys(state), strict=True)


def headbench_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ResNet keys (``conv1.weight``, ``fc.bias``) and DDP keys to HeadNet keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("backbone.", "head.")):
            out[key] = value
        elif key.startswith("fc."):
            out["head." + key] = value  # the ImageNet fc: only used if the new head has the same shape
        else:
            out["backbone." + key] = value
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load the backbone strictly (every key, every shape); load the head only where it fits exactly."""
    state = headbench_keys(state)
    own = model.state_dict()
    backbone_own = {k for k in own if k.startswith("backbone.")}
    backbone_given = {k for k in state if k.startswith("backbone.")}
    arch = getattr(model, "arch", "this architecture")
    missing, unexpected = sorted(backbone_own - backbone_given), sorted(backbone_given - backbone_own)
    mismatched = sorted(k for k in backbone_own & backbone_given if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys"
                  f" (e.g. {(missing or unexpected or mismatched)[0]})")
        raise WeightsError(f"weights {source!r} do not fit a {arch} backbone: {detail}")
    head_given = {k: v for k, v in state.items() if k.startswith("head.")}
    head_own = {k: v for k, v in own.items() if k.startswith("head.")}
    head_fits = head_given.keys() == head_own.keys() and all(
        head_own[k].shape == v.shape for k, v in head_given.items())
    selected = {k: v for k, v in state.items() if k.startswith("backbone.") or (head_fits and k in head_own)}
    model.load_state_dict(selected, strict=False)
