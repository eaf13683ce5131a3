"""models.loop.fit in one process: seeds, data order, resume, early stopping, target BN statistics for
probes, augmentation. The same function runs inside every Ray Train worker (tests/integration)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from models import build_model
from models.augment import feature_input, image_input, random_crop_flip, random_resized_crop_flip
from models.data import ArrayDataset, ArraySplit, epoch_loader, normalize_batch, set_epoch
from models.loop import EpochEnd, FitConfig, FitHooks, extract_features, fit, train_one_epoch
from models.schedules import warmup_cosine


def _split(n: int, seed: int, classes: int = 3) -> ArraySplit:
    """Images whose class shows in their brightness, so a few epochs learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 80, size=(n, 1, 32, 32)) + labels[:, None, None, None] * 70
    return ArraySplit(images.astype(np.uint8), labels.astype(np.int64))


TRAIN, VAL = _split(48, 0), _split(24, 1)


def _fit(strategy: str = "replace-fc", seed: int = 0, **overrides: object) -> tuple[torch.nn.Module, object]:
    from models.strategies import parse_strategy

    model = build_model("resnet18", 3, strategy, seed=seed)
    cfg = FitConfig(**({"schedule": parse_strategy(strategy).schedule, "epochs": 2, "batch_size": 16, "lr": 0.05,
                        "seed": seed, "precise_bn_batches": 2} | overrides))  # type: ignore[arg-type]
    return model, fit(model, cfg, TRAIN, VAL)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_same_seed_same_initial_weights_and_shared_inits_across_strategies() -> None:
    assert _same(build_model("resnet18", 3, "mlp", seed=4), build_model("resnet18", 3, "mlp", seed=4))
    assert not _same(build_model("resnet18", 3, "mlp", seed=4), build_model("resnet18", 3, "mlp", seed=5))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    build_model("resnet18", 3, "mlp", seed=4)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is left alone
    # one shape, two schedules: the same backbone and the same head
    assert _same(build_model("resnet18", 3, "replace-fc", seed=2),
                 build_model("resnet18", 3, "replace-fc+lp-ft", seed=2))
    # two shapes: the same backbone
    a, b = build_model("resnet18", 3, "replace-fc", seed=2), build_model("resnet18", 3, "fastai+gradual", seed=2)
    assert _same(a.backbone, b.backbone)


def test_fit_is_reproducible_from_its_seed() -> None:
    a, result_a = _fit("mlp", seed=1, augment="standard")
    b, result_b = _fit("mlp", seed=1, augment="standard")
    c, _ = _fit("mlp", seed=2, augment="standard")
    assert _same(a, b) and not _same(a, c)
    strip = [{k: v for k, v in row.items() if k in ("train_loss", "val_loss", "val_accuracy")}
             for row in result_a.history]
    assert strip == [{k: v for k, v in row.items() if k in strip[0]} for row in result_b.history]


def test_each_epoch_and_each_seed_has_its_own_order_and_ranks_split_the_data() -> None:
    data = ArrayDataset(TRAIN)

    def order(seed: int, epoch: int, rank: int) -> list[int]:
        loader = epoch_loader(data, 8, rank=rank, world=2, seed=seed, shuffle=True)
        set_epoch(loader, epoch)
        return list(loader.sampler)

    assert order(0, 0, 0) == order(0, 0, 0)
    assert order(0, 0, 0) != order(0, 1, 0)  # set_epoch: a new order every epoch
    assert order(0, 0, 0) != order(1, 0, 0)  # the seed picks the order
    assert set(order(0, 3, 0)).isdisjoint(order(0, 3, 1))
    assert sorted(order(0, 3, 0) + order(0, 3, 1)) == list(range(len(TRAIN)))


def test_fit_calls_set_epoch_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, int]] = []
    original = DistributedSampler.set_epoch

    def recording(self: DistributedSampler, epoch: int) -> None:
        calls.append((self.shuffle, epoch))
        original(self, epoch)

    monkeypatch.setattr(DistributedSampler, "set_epoch", recording)
    model = build_model("resnet18", 3, "replace-fc", seed=0)
    fit(model, FitConfig(epochs=3, batch_size=16, precise_bn_batches=0, augment="none"), TRAIN, VAL)
    assert calls == [(True, 0), (True, 1), (True, 2)]


def test_resume_from_a_checkpointed_state_continues_exactly() -> None:
    cfg = FitConfig(epochs=3, batch_size=16, lr=0.05, augment="none", precise_bn_batches=2)
    checkpoints: list[tuple[object, dict[str, torch.Tensor]]] = []

    def checkpoint(end: EpochEnd) -> None:  # what the Ray worker writes: the state and the weights
        checkpoints.append((copy.deepcopy(end.state), {k: v.clone() for k, v in end.model.state_dict().items()}))

    full = build_model("resnet18", 3, "replace-fc", seed=0)
    fit(full, cfg, TRAIN, VAL, FitHooks(on_epoch=checkpoint))
    state, weights = checkpoints[1]  # after epoch 2 of 3
    resumed = build_model("resnet18", 3, "replace-fc", seed=0)
    resumed.load_state_dict(weights)
    result = fit(resumed, cfg, TRAIN, VAL, FitHooks(resume=state))  # type: ignore[arg-type]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert _same(resumed, full)


def test_early_stopping_keeps_the_best_epoch() -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def keep(end: EpochEnd) -> None:
        weights[int(end.row["epoch"])] = {k: v.clone() for k, v in end.model.state_dict().items()}

    model = build_model("resnet18", 3, "replace-fc", seed=0)
    # a far too high LR: val loss gets worse after the first epochs, and patience 2 ends the run
    cfg = FitConfig(epochs=8, batch_size=16, lr=2.0, augment="none", precise_bn_batches=2,
                    early_stopping_patience=2)
    result = fit(model, cfg, TRAIN, VAL, FitHooks(on_epoch=keep))
    losses = [row["val_loss"] for row in result.history]
    best = int(np.argmin(losses)) + 1
    assert result.best_epoch == best
    assert result.stopped_early and len(losses) == best + 2 < 8
    assert all(torch.equal(v, weights[best][k]) for k, v in model.state_dict().items())


def test_probe_features_use_target_batchnorm_statistics() -> None:
    for stats_mode, moved in (("target", True), ("source", False)):
        model = build_model("resnet18", 3, "replace-fc+linear-probe", seed=0)
        with torch.no_grad():
            model.backbone.bn1.running_mean.fill_(50.0)  # statistics of some other domain
        fit(model, FitConfig(schedule="linear-probe", epochs=1, batch_size=16, probe_bn_stats=stats_mode),
            TRAIN, VAL)
        stale = torch.all(model.backbone.bn1.running_mean == 50.0).item()
        assert stale != moved, stats_mode


def test_label_smoothing_and_warmup() -> None:
    factor = warmup_cosine(total_steps=10, warmup_steps=4)
    assert [round(factor(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    # lr 0: the weights never move, so the two runs differ in the training loss's targets alone
    _, smooth = _fit(label_smoothing=0.3, augment="none", lr=0.0, epochs=1)
    _, plain = _fit(label_smoothing=0.0, augment="none", lr=0.0, epochs=1)
    assert smooth.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"], rel=1e-4)
    assert smooth.history[0]["val_loss"] == pytest.approx(plain.history[0]["val_loss"], rel=1e-6)  # unsmoothed


def test_augmentations() -> None:
    images = torch.rand(6, 3, 32, 32)
    out = random_resized_crop_flip(images, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for x, y in zip(images, out, strict=True):  # a full-size crop: the image itself or its mirror
        assert torch.allclose(x, y, atol=1e-5) or torch.allclose(x.flip(-1), y, atol=1e-5)
    cropped = random_resized_crop_flip(images)
    assert cropped.shape == images.shape and not torch.allclose(cropped, images)
    raw = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(image_input(augment="standard")(raw, False), image_input(augment="none")(raw, True))
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'; allowed: none, flip, crop, standard"):
        image_input(augment="rotate")


def test_crop_shifts_each_image_by_whole_pixels_within_its_padding() -> None:
    images = torch.rand(64, 3, 32, 32)
    torch.manual_seed(0)
    out = random_crop_flip(images)  # pad 32 // 16 = 2
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    shifts = []
    for x, y in zip(padded, out, strict=True):  # the (dy, dx, flipped) windows of the padded image it equals
        found = [(dy, dx, flipped) for dy in range(5) for dx in range(5) for flipped in (False, True)
                 if torch.equal(y, x[:, dy:dy + 32, dx:dx + 32].flip(-1) if flipped else x[:, dy:dy + 32, dx:dx + 32])]
        assert found, "an output that is no shifted window of its image"
        shifts.append(found[0])
    assert len({s[:2] for s in shifts}) > 10 and {s[2] for s in shifts} == {False, True}  # per image, not per batch
    torch.manual_seed(0)
    assert torch.equal(random_crop_flip(images), out)  # seeded: the same draws


def test_cached_features_give_the_same_head_logits() -> None:
    model = build_model("resnet18", 4, "mlp:catavgmax+linear-probe").eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    cached = extract_features(model.backbone, images, torch.device("cpu"), batch_size=3)
    assert cached.shape == (10, 512, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.head(cached), model(normalize_batch(images)), rtol=1e-5, atol=1e-5)


def test_head_trains_on_cached_features_and_backbone_stays_put() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "replace-fc+linear-probe")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    features = extract_features(model.backbone, images, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=8)
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.01)
    losses = [train_one_epoch(model.head, torch.nn.CrossEntropyLoss(), optimizer, loader, torch.device("cpu"),
                              prepare=feature_input).loss for _ in range(15)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_precise_bn_replaces_lagging_running_stats_by_exact_means() -> None:
    from models.loop import recompute_bn_stats

    torch.manual_seed(0)
    model = build_model("resnet18", 3, "mlp")
    images = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(24, dtype=torch.long)),
                                         batch_size=8)
    with torch.no_grad():
        model.backbone.bn1.running_mean.fill_(123.0)  # a stale statistic from another domain
    used = recompute_bn_stats(model, loader, torch.device("cpu"), max_batches=2)
    assert used == 2 and model.backbone.bn1.momentum == 0.1  # momentum restored
    # bn1 sees conv1's output: its exact mean over the two batches, per channel
    with torch.no_grad():
        x = normalize_batch(images[:16])
        expected = model.backbone.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.backbone.bn1.running_mean, expected, rtol=1e-4, atol=1e-4)


def test_fp16_autocast_trains_with_a_loss_scaler() -> None:
    """fp16 steps go through a GradScaler (fp16 gradients underflow without it): the weights move, the loss
    stays finite."""
    from models.loop import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (4,))) for _ in range(3)]
    stats = train_one_epoch(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                            batches, torch.device("cpu"), autocast_dtype=torch.float16)
    assert math.isfinite(stats.loss) and stats.images == 12
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
