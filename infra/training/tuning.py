"""Learning-rate search per head strategy on Ray Tune: a log-spaced LR grid, ASHA early stopping on the
validation loss, the same trial budget for every strategy, trials on the Ray cluster the runs train on.

A trial is one Tune function trainable that runs ``models.loop.fit`` in its own process with the trial's
CPUs: the loop every run trains with, reporting each epoch to Tune, so ASHA can stop it after any epoch.
Nothing here logs to MLflow: the driver turns the result grid into nested runs (``tasks.compare``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infra.processes.interrupts import fit_interruptibly
from models.data import ArraySplit

TUNE_METRIC = "val_loss"  # what ASHA stops on and the best trial is chosen by (lower is better)


def lr_grid(base_lr: float, trials: int, decades: float = 3.0) -> list[float]:
    """``trials`` LRs log-spaced over ``decades`` decades, centred (in log space) on ``base_lr``."""
    if trials < 1:
        raise ValueError(f"tune trials must be >= 1, got {trials}")
    if trials == 1:
        return [base_lr]
    low = math.log10(base_lr) - decades / 2
    return [10 ** (low + decades * i / (trials - 1)) for i in range(trials)]


@dataclass(frozen=True)
class Trial:
    lr: float
    history: list[dict[str, float]]  # one row per epoch it ran (ASHA may stop it early)
    stopped_early: bool
    error: str | None = None

    @property
    def final_val_loss(self) -> float:
        return self.history[-1][TUNE_METRIC] if self.history else math.inf


@dataclass(frozen=True)
class TuneOutcome:
    strategy: str
    best_lr: float
    trials: list[Trial]  # in grid order


def _trial(config: dict[str, Any]) -> None:
    """One trial: fit with the trial's LR, one Tune report per epoch (Tune may stop it after any)."""
    import ray
    import ray.tune
    import torch

    from infra.training.worker import TrainConfig
    from models import build_model

    cfg = TrainConfig.from_dict(config["train"]).with_fit(lr=config["lr"])
    torch.set_num_threads(config["threads"])
    train, val = ray.get(config["data_ref"])
    model = build_model(cfg.arch, cfg.num_classes, cfg.strategy, None, **cfg.head)
    model.load_state_dict(ray.get(config["init_ref"]))
    from models.loop import FitHooks, fit

    fit(model, cfg.fit, train, val,
        FitHooks(on_epoch=lambda end: ray.tune.report({k: v for k, v in end.row.items()})))


def tune_lr(cfg: Any, train: ArraySplit, val: ArraySplit, init_state: dict[str, Any], *, trials: int,
            cpus_per_trial: int, storage: tuple[str, Any], name: str) -> TuneOutcome:
    """Search the base LR of ``cfg`` (a TrainConfig) on the validation split; returns every trial and the best.

    The caller has started or joined Ray. Every strategy gets the same grid size and epochs (the same
    trial budget); ASHA (grace 1 epoch, halving) stops the worse half of the trials at each rung.
    """
    from dataclasses import asdict, replace

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    grid = lr_grid(cfg.fit.lr, trials)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.fit.epochs, grace_period=1, reduction_factor=2)
    storage_path, storage_fs = storage
    one_worker = replace(cfg, resources=replace(cfg.resources, workers=1))  # a trial is one process
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": cpus_per_trial}),
        param_space={"lr": tune.grid_search(grid), "train": asdict(one_worker),
                     "threads": cpus_per_trial, "data_ref": ray.put((train, val)), "init_ref": ray.put(init_state)},
        tune_config=tune.TuneConfig(metric=TUNE_METRIC, mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0),
    )
    results = fit_interruptibly(tuner)  # not on this thread: Tune's SIGINT handler would outlive the search
    found: dict[float, Trial] = {}
    for result in results:
        lr = float(result.config["lr"])
        frame = result.metrics_dataframe
        rows = [] if frame is None else frame.to_dict("records")
        history = [{k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                   for row in rows]
        found[lr] = Trial(lr, history, stopped_early=len(history) < cfg.fit.epochs,
                          error=str(result.error).splitlines()[0] if result.error else None)
    ordered = [found[lr] for lr in grid if lr in found]
    complete = [t for t in ordered if t.error is None and t.history]
    if not complete:
        raise RuntimeError(f"every LR trial of {cfg.strategy} failed: {ordered[0].error if ordered else 'no trial'}")
    best = min(complete, key=lambda t: (t.stopped_early, t.final_val_loss))  # full-length trials first
    return TuneOutcome(cfg.strategy, best.lr, ordered)
