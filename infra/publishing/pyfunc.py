"""The MLflow pyfunc of a published headbench model (MLflow "models from code").

MLflow copies this file into the logged model and runs it to load the model, so loading never unpickles
anything: the weights are the safetensors file of the S3 publication, checked against the manifest's
sha256, and the preprocessing is the manifest's. It imports only MLflow, NumPy, pandas, torch and the
pure-PyTorch ``models`` package, which the logged model carries in its ``code/`` folder.

Input: uint8 images, (N, H, W) for a model trained on grayscale, (N, H, W, 3) for RGB (either form is
accepted when the signature is not enforced). Output: one row per image with the top ``label``, its
``probability`` and every class's ``probabilities`` in ``class_names`` order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from models.data import normalize_batch
from models.predict import model_from_manifest, prepare_images
from models.weights import read_state_dict, sha256_file


class HeadbenchClassifier(PythonModel):
    """Published weights + manifest -> an image classifier returning class names and probabilities."""

    # Input is checked against the logged model's explicit signature (infra.publishing.logged_model.signature), not
    # against type hints of predict: MLflow's switch for that (it would otherwise warn that predict has no
    # type hint, and wrap it in a second, list-based check).
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        weights = Path(context.artifacts["weights"])
        self.manifest: dict[str, Any] = json.loads(Path(context.artifacts["manifest"]).read_text())
        digest = sha256_file(weights)
        if digest != self.manifest["sha256"]:
            raise ValueError(f"weights sha256 {digest[:12]}... differ from the manifest's "
                             f"{self.manifest['sha256'][:12]}...; the logged model is corrupt")
        self.model = model_from_manifest(self.manifest, read_state_dict(weights))
        self.class_names: list[str] = list(self.manifest["class_names"])

    @torch.no_grad()
    def predict(self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        batch = prepare_images(np.asarray(model_input), int(self.manifest["image_size"]),
                               int(self.manifest.get("channels", 3)))

        probs = torch.softmax(self.model(normalize_batch(batch)), dim=1)  # (N, num_classes)
        top, index = probs.max(dim=1)
        return pd.DataFrame({"label": [self.class_names[i] for i in index.tolist()],
                             "probability": top.tolist(),
                             "probabilities": [row for row in probs.numpy().astype(np.float64)]})


mlflow.models.set_model(HeadbenchClassifier())
