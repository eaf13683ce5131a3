"""Comparison of head strategies: one child run per strategy x seed, and the summary over them.

The summary (``models.stats``): mean and 95% t-interval per strategy, the winner, and for every other
strategy the paired 95% t-interval of its per-seed difference to the winner; the table and chart go to
the MLflow parent run and to Prefect.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.data.spec import PreparedData
from infra.settings import Settings
from infra.storage.checkpoints import ray_storage
from infra.tracking.plots import learning_curves_png
from infra.tracking.runs import Tracker, start_run
from infra.training.cluster import init_ray
from infra.training.trainer import TrainConfig, run_training
from infra.training.tuning import TUNE_METRIC, lr_grid, tune_lr
from models import build_model, parse_strategy
from models.schedules import describe_plan, phase_params
from models.stats import Interval, paired_difference
from tasks import TIMEOUT_S
from tasks.evaluate import evaluate_split


@dataclass(frozen=True)
class ChildResult:
    strategy: str
    seed: int
    run_id: str
    test_accuracy: float
    test_macro_f1: float
    train_seconds: float
    trainable_params: int
    images_per_second: float  # training images / training seconds over all epochs
    history: list[dict[str, float]]
    lr: float = 0.0  # the base LR it trained at


@dataclass(frozen=True)
class StrategyRow:
    strategy: str
    runs: int
    accuracy: Interval
    macro_f1: Interval
    versus_winner: Interval | None  # paired interval of (winner - this) per seed; None for the winner
    lr: float  # the base LR its children trained at (the tuned one with --tune lr)
    train_seconds: float
    trainable_params: int
    images_per_second: float

    @property
    def separated(self) -> bool:
        """The winner is better than this strategy: the paired interval of the differences excludes 0."""
        return self.versus_winner is not None and self.versus_winner.excludes_zero()


@dataclass(frozen=True)
class Comparison:
    rows: list[StrategyRow]  # best mean test accuracy first
    winner: str
    runner_up: str | None
    margin: float  # winner's mean accuracy minus the runner-up's
    separated: bool  # the paired 95% interval of winner - runner-up per seed excludes 0

    def verdict(self) -> str:
        if self.runner_up is None:
            return f"only one strategy: {self.winner}"
        head = f"winner {self.winner} by {self.margin:+.4f} test accuracy over {self.runner_up}"
        paired = self.rows[1].versus_winner
        if paired is None or not paired.defined:
            return f"{head}; one seed: no interval"
        band = f"paired 95% CI of the difference [{paired.low:+.4f}, {paired.high:+.4f}] over {paired.n} seeds"
        return f"{head}; {band} {'excludes 0: separated' if self.separated else 'includes 0: not separated'}"


def summarize(results: list[ChildResult]) -> Comparison:
    """Per strategy: mean and t-interval over seeds; against the winner: the paired interval per seed."""
    by_strategy: dict[str, list[ChildResult]] = {}
    for r in results:
        by_strategy.setdefault(r.strategy, []).append(r)
    ranked = sorted(by_strategy.items(), key=lambda kv: Interval.of([r.test_accuracy for r in kv[1]]).mean,
                    reverse=True)
    winner_scores = {r.seed: r.test_accuracy for r in ranked[0][1]}
    rows = []
    for i, (name, rs) in enumerate(ranked):
        versus = None if i == 0 else paired_difference(winner_scores, {r.seed: r.test_accuracy for r in rs})
        rows.append(StrategyRow(name, len(rs), Interval.of([r.test_accuracy for r in rs]),
                                Interval.of([r.test_macro_f1 for r in rs]), versus, rs[0].lr,
                                sum(r.train_seconds for r in rs) / len(rs), rs[0].trainable_params,
                                sum(r.images_per_second for r in rs) / len(rs)))
    winner, runner = rows[0], rows[1] if len(rows) > 1 else None
    margin = winner.accuracy.mean - runner.accuracy.mean if runner else 0.0
    return Comparison(rows, winner.strategy, runner.strategy if runner else None, margin,
                      bool(runner and runner.separated))


def _ci(i: Interval) -> str:
    """'mean [low, high]', the interval clipped to [0, 1] (it bounds a proportion)."""
    if not i.defined:
        return f"{i.mean:.4f}"
    return f"{i.mean:.4f} [{max(0.0, i.low):.4f}, {min(1.0, i.high):.4f}]"


def _paired(i: Interval | None) -> str:
    if i is None:
        return "winner"
    if not i.defined:
        return f"{-i.mean:+.4f} (one seed)"
    return f"{-i.mean:+.4f} [{-i.high:+.4f}, {-i.low:+.4f}]"  # this minus the winner


def table_records(comparison: Comparison) -> list[dict[str, Any]]:
    """One dict per strategy (the Prefect table artifact and the MLflow JSON)."""
    return [{"strategy": r.strategy, "runs": r.runs, "test acc [95% CI]": _ci(r.accuracy),
             "vs winner [paired 95% CI]": _paired(r.versus_winner), "macro-F1 [95% CI]": _ci(r.macro_f1),
             "lr": f"{r.lr:.3g}", "train s": round(r.train_seconds, 1), "trainable params": r.trainable_params,
             "img/s": round(r.images_per_second, 1)}
            for r in comparison.rows]


def markdown_table(comparison: Comparison) -> str:
    records = table_records(comparison)
    header = list(records[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(rec[h]) for h in header) + " |" for rec in records]
    return "\n".join(lines) + f"\n\n{comparison.verdict()}\n"


def comparison_png(comparison: Comparison, results: list[ChildResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.strategy for r in comparison.rows]
    labels = [f"{r.strategy} (lr {r.lr:.3g})" for r in comparison.rows]
    means = [r.accuracy.mean for r in comparison.rows]
    errors = [r.accuracy.mean - r.accuracy.low if r.accuracy.defined else 0.0 for r in comparison.rows]
    bars.barh(labels[::-1], means[::-1], xerr=errors[::-1], capsize=4, color="tab:blue", alpha=0.8)
    bars.set(xlabel="test accuracy (mean, 95% CI)", title="head strategies")
    low = min(m - e for m, e in zip(means, errors, strict=True))
    bars.set_xlim(max(0.0, low - 0.05), min(1.0, max(means) + 0.05))
    for i, name in enumerate(names):
        runs = [r for r in results if r.strategy == name]
        by_epoch: dict[float, list[float]] = {}  # early stopping can end seeds at different epochs
        for run in runs:
            for row in run.history:
                by_epoch.setdefault(row["epoch"], []).append(row["val_accuracy"])
        epochs = sorted(by_epoch)
        curves.plot(epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs], marker="o", label=labels[i],
                    color=f"C{i % 10}")
    curves.set(xlabel="epoch", ylabel="val accuracy (mean over seeds)", title="learning curves")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.suptitle(comparison.verdict(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="fit-strategy", timeout_seconds=TIMEOUT_S["fit-strategy"], cache_policy=NO_CACHE, log_prints=True)
def fit_strategy(strategy: str, seed: int, cfg: TrainConfig, data: PreparedData, weights: str | None,
                 child_params: dict[str, Any], settings: Settings, tracking_uri: str, experiment: str,
                 parent_run_id: str) -> ChildResult:
    """Build, fine-tune and test one strategy x seed as a nested MLflow run of the comparison."""
    spec = parse_strategy(strategy)
    model = build_model(cfg.arch, data.num_classes, spec.name, weights, **cfg.head, seed=seed)
    tracker = start_run(tracking_uri, experiment, f"{spec.name}-seed{seed}", parent_run_id=parent_run_id, tags={
        "strategy": spec.name, "shape": spec.shape, "pool": spec.pool, "schedule": spec.schedule,
        "seed": str(seed), "headbench.kind": "compare-child"})
    with tracker.lifecycle():
        phases = describe_plan(model, spec.schedule, cfg.fit.epochs, cfg.fit.probe_epochs, cfg.fit.lr)
        trainable = max(p["trainable_params"] for p in phases)  # the widest phase (full-ft: all parameters)
        tracker.log_params(child_params | {"strategy": spec.name, "seed": seed, "trainable_params": trainable,
                                           "in_features": model.in_features, "lr": cfg.fit.lr} | phase_params(phases))
        tracker.log_dict(phases, "training/phases.json")
        started = time.perf_counter()
        outcome = run_training(cfg, data.train, data.val, model.state_dict(), settings=settings,
                               tracking_uri=tracking_uri, run_id=tracker.run_id, run_key=tracker.run_id)
        seconds = time.perf_counter() - started
        model.load_state_dict(outcome.state_dict)
        tracker.set_tags(outcome.tags())
        metrics = evaluate_split(model, data.test, data.num_classes)
        tracker.log_metrics(metrics.as_dict() | {"train_seconds": seconds})
        tracker.log_dict(outcome.history, "training/history.json")
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(learning_curves_png(outcome.history, Path(tmp) / "learning_curves.png"), "training")
    seen = sum(row["images_per_second"] * row["epoch_seconds"] for row in outcome.history)
    busy = sum(row["epoch_seconds"] for row in outcome.history)
    return ChildResult(spec.name, seed, tracker.run_id, metrics.accuracy, metrics.macro_f1, seconds, trainable,
                       seen / busy if busy else 0.0, outcome.history, cfg.fit.lr)


@task(name="tune-lr", timeout_seconds=TIMEOUT_S["tune-lr"], cache_policy=NO_CACHE, log_prints=True)
def tune_strategy(strategy: str, cfg: TrainConfig, data: PreparedData, weights: str | None, trials: int,
                  settings: Settings, tracking_uri: str, experiment: str, parent_run_id: str) -> float:
    """Search one strategy's LR on Ray Tune (ASHA on val loss) and log it as parent -> strategy -> trial runs.
    Returns the best LR."""
    spec = parse_strategy(strategy)
    model = build_model(cfg.arch, data.num_classes, spec.name, weights, **cfg.head, seed=cfg.fit.seed)
    tracker = start_run(tracking_uri, experiment, f"tune-{spec.name}", parent_run_id=parent_run_id, tags={
        "strategy": spec.name, "headbench.kind": "tune-strategy"})
    with tracker.lifecycle():
        grid = lr_grid(cfg.fit.lr, trials)
        tracker.log_params({"strategy": spec.name, "tune": "lr", "tune_trials": trials, "tune_scheduler": "ASHA",
                            "tune_metric": TUNE_METRIC, "lr_grid": ",".join(f"{lr:.3g}" for lr in grid),
                            "epochs": cfg.fit.epochs, "seed": cfg.fit.seed})
        init_ray(settings)
        outcome = tune_lr(cfg, data.train, data.val, model.state_dict(), trials=trials,
                          cpus_per_trial=cfg.resources.cpus_per_worker or 1, storage=ray_storage(settings, "tune"),
                          name=tracker.run_id)
        for i, trial in enumerate(outcome.trials):
            child = start_run(tracking_uri, experiment, f"{spec.name}-lr{trial.lr:.3g}", parent_run_id=tracker.run_id,
                              tags={"strategy": spec.name, "headbench.kind": "tune-trial",
                                    "stopped_by_asha": str(trial.stopped_early).lower(),
                                    "best": str(trial.lr == outcome.best_lr).lower()})
            with child.lifecycle():
                child.log_params({"lr": trial.lr, "trial": i, "strategy": spec.name})
                for row in trial.history:
                    child.log_metrics({k: row[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
                                       if k in row}, step=int(row["epoch"]))
                if trial.error:
                    child.set_tags({"error": trial.error[:500]})
        tracker.log_metrics({"best_lr": outcome.best_lr})
        tracker.set_tags({"best_lr": f"{outcome.best_lr:.4g}"})
        tried = ", ".join(f"{t.lr:.3g}: {t.final_val_loss:.3f}{' (ASHA stop)' if t.stopped_early else ''}"
                          for t in outcome.trials)
        print(f"tune {spec.name}: best lr {outcome.best_lr:.4g} (val loss by lr: {tried})")
    return outcome.best_lr


@task(name="summarize", timeout_seconds=TIMEOUT_S["summarize"], cache_policy=NO_CACHE)
def report_comparison(results: list[ChildResult], parent: Tracker) -> Comparison:
    """Table, chart and verdict on the MLflow parent run."""
    comparison = summarize(results)
    parent.log_dict({"rows": table_records(comparison), "verdict": comparison.verdict(),
                     "runs": [asdict(r) | {"history": None} for r in results]}, "comparison/table.json")
    parent.log_text(markdown_table(comparison), "comparison/table.md")
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(comparison_png(comparison, results, Path(tmp) / "comparison.png"), "comparison")
    metrics = {"winner_margin": comparison.margin, "winner_separated": float(comparison.separated)}
    for row in comparison.rows:
        metrics[f"mean_test_accuracy_{row.strategy}"] = row.accuracy.mean
    parent.log_metrics({k.replace("+", "_").replace(":", "_"): v for k, v in metrics.items()})
    # the verdict is also the parent run's description, which the MLflow UI shows at the top of the run
    parent.set_tags({"winner": comparison.winner, "verdict": comparison.verdict(),
                     "mlflow.note.content": comparison.verdict()})
    return comparison

