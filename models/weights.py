"""Safe checkpoint reading and strict loading into a HeadNet.

Only safetensors or ``torch.load(weights_only=True)`` are used: a checkpoint is data, never code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"


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


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Save the unwrapped model's state dict as safetensors (no DDP ``module.`` prefixes)."""
    inner = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    save_file(state, path)


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    state = _normalise_keys(state)
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
