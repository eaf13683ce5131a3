"""models/predict.py: a published model rebuilt from its manifest, and user arrays turned into the
training batch form ((N, H, W) gray or (N, H, W, 3) RGB -> uint8 (N, C, S, S))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model
from models.predict import model_from_manifest, prepare_images
from models.weights import publishable_state_dict


def test_gray_and_rgb_inputs_become_the_training_channel_count_and_size() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    assert prepare_images(gray, 32, 1).shape == (2, 1, 32, 32)
    assert prepare_images(gray, 32, 3).shape == (2, 3, 32, 32)
    assert prepare_images(rgb, 28, 3).shape == (2, 3, 28, 28)
    # an RGB image whose three channels are equal converts to exactly that gray image (luma weights sum to 1)
    np.testing.assert_array_equal(prepare_images(rgb, 28, 1).numpy()[:, 0], gray)
    assert prepare_images(gray[..., None], 28, 1).shape == (2, 1, 28, 28)  # (N, H, W, 1) is gray too
    assert prepare_images(gray, 28, 1).dtype == torch.uint8


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((2, 8, 8), dtype=np.float32), "uint8"),
    (np.zeros((2, 8, 8, 4), dtype=np.uint8), r"\(N, H, W, 3\)"),
    (np.zeros((8, 8), dtype=np.uint8), "shape"),
    (np.zeros((0, 8, 8), dtype=np.uint8), "no images"),
])
def test_unusable_arrays_are_refused_with_what_is_allowed(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_images(bad, 32, 1)


@pytest.mark.parametrize("strategy", ["replace-fc", "mlp+lp-ft", "fastai"])
def test_model_from_manifest_rebuilds_every_strategy_from_either_key_format(strategy: str) -> None:
    source = build_model("resnet18", 3, strategy, hidden_dim=64, dropout=0.1, seed=4).eval()
    state, _ = publishable_state_dict(source)
    manifest = {"arch": "resnet18", "num_classes": 3, "strategy": strategy, "head": {"hidden_dim": 64, "dropout": 0.1}}
    rebuilt = model_from_manifest(manifest, state)
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), source(x))
