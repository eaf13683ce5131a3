"""infra/training/trainer.py without a cluster: the trainer class the driver builds (no Ray started)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def trainer_cls() -> type:
    pytest.importorskip("ray.train.torch")
    from ray.train.torch import TorchTrainer

    from infra.training.trainer import trainer_class

    return trainer_class(TorchTrainer)


def _callbacks(trainer_cls: type, **kwargs: object) -> list[str]:
    from ray.train import ScalingConfig

    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_without_ray_datasets_train_starts_no_dataset_manager(trainer_cls: type) -> None:
    """headbench passes arrays through the object store: Ray Data's callback (a DatasetManager actor per run,
    Ray Data imported in every worker) is left out, and every other default callback is kept."""
    names = _callbacks(trainer_cls)
    assert "DatasetsCallback" not in names
    assert {"BackendSetupCallback", "PlacementGroupCleanerCallback", "UserCallbackHandler"} <= set(names)


def test_with_a_ray_dataset_the_datasets_callback_stays(trainer_cls: type) -> None:
    assert "DatasetsCallback" in _callbacks(trainer_cls, datasets={"train": lambda: None})
