"""The quality benchmark (`make quality`, `python -m bench quality`): does the pipeline train as well as a
plain script, how good is the best recipe within a time budget, and what does the demo comparison say.

All in one process, on one machine, one after the other:

- (a) the same recipe twice on the full 10-class Fashion-MNIST: a plain script (``models.loop.fit`` in this
      process: no Ray, Prefect or MLflow) and the ``retrain`` flow (Ray Train, MLflow, S3). Same split, seed,
      initial weights and data order, so the two test accuracies should agree to within 0.5 point;
      Per epoch, each side's steps, validation and the rest of the epoch's wall time (the checkpoint and the
      report between epochs), and three ratios: steps img/s, per-epoch wall and end to end;
- (b) the best recipe at a 10-epoch budget (``BEST_RECIPE``, the plain loop: (a) shows the pipeline trains
      it to the same accuracy) on the full 10,000-image test set, against the goal of 0.93, its wall time
      reported;
- (c) the demo's transfer comparison through the ``compare-heads`` flow (source model on classes 0-4,
      strategies on classes 5-9 from its backbone): per strategy the mean and the paired interval against
      the winner, each two-phase schedule against its own linear probe, and the first fine-tuning epoch's
      train loss against the probe's last; plus the same probe -> fine-tune with the probe on source
      BatchNorm statistics (``probe_bn_stats=source``), in one process, to show what the target statistics fix.

Prints a table, writes ``bench/quality.json`` and ``docs/quality.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.sampling import ServiceCpu

QUALITY_DOC = Path("docs/quality.md")
GOAL_ACCURACY, GOAL_GAP, GOAL_RATIO = 0.93, 0.005, 0.95
PROBE_LOSS_RATIO = 1.2  # first fine-tune epoch's train loss <= 1.2 x the probe's last
PROBE_TOLERANCE = 0.01  # a two-phase schedule scores >= its linear probe - 1 point


@dataclass(frozen=True)
class Recipe:
    """The recipe of (a) and (b): ResNet-18 from random init on all of Fashion-MNIST."""

    strategy: str = "replace-fc"
    image_size: int = 32
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    warmup_epochs: float = 0.3
    weight_decay: float = 5e-4
    augment: str = "flip"
    label_smoothing: float = 0.0
    limit: int | None = None  # full training pool: 54,000 train + 6,000 val
    test_limit: int | None = None  # full test set: 10,000
    seed: int = 0

    def params(self) -> dict[str, Any]:
        return asdict(self)


# (b): ten epochs of the same loop at the peak LR a batch of 128 takes, a half-epoch warm-up and cosine to 0
BEST_RECIPE = Recipe(epochs=10, batch_size=128, lr=0.1, warmup_epochs=0.5, augment="flip", label_smoothing=0.1)


@dataclass(frozen=True)
class DemoStudy:
    strategies: tuple[str, ...] = ("replace-fc", "mlp", "replace-fc+linear-probe", "replace-fc+lp-ft",
                                   "mlp+linear-probe", "mlp+lp-ft", "fastai+gradual")
    seeds: int = 3
    ablation_seeds: int | None = None  # seeds of the source-BN ablation (default: seeds)
    source: tuple[tuple[str, Any], ...] = ()  # overrides of the demo's source run (the tiny setting)
    target: tuple[tuple[str, Any], ...] = ()  # overrides of the demo's target comparison


@dataclass
class QualityFigures:
    machine: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    plain_accuracy: float | None = None
    plain_seconds: float | None = None
    plain_history: list[dict[str, float]] = field(default_factory=list)
    pipeline_accuracy: float | None = None
    pipeline_seconds: float | None = None
    pipeline_run_url: str = ""
    pipeline_history: list[dict[str, float]] = field(default_factory=list)
    best_recipe: dict[str, Any] = field(default_factory=dict)
    best_accuracy: float | None = None
    best_seconds: float | None = None
    best_history: list[dict[str, float]] = field(default_factory=list)
    demo_table: list[dict[str, Any]] = field(default_factory=list)
    demo_verdict: str = ""
    demo_parent_url: str = ""
    demo_checks: list[dict[str, Any]] = field(default_factory=list)
    source_bn_ablation: list[dict[str, Any]] = field(default_factory=list)
    # cores each process group used during the retrain flow's steps (first step of epoch 1 to the last step of
    # the last epoch), from the bench's /proc sampler: what runs beside the training worker
    pipeline_step_cores: dict[str, float] = field(default_factory=dict)

    def gap(self) -> float | None:
        if self.plain_accuracy is None or self.pipeline_accuracy is None:
            return None
        return abs(self.plain_accuracy - self.pipeline_accuracy)

    def ratios(self) -> dict[str, float | None]:
        """Plain over pipeline (1.0: the pipeline costs nothing): steps img/s (pipeline over plain), per-epoch
        wall (the epochs that have a next one), end to end."""
        from bench import epoch_walls
        from bench.config import paired_ratio  # the median of epoch-by-epoch ratios (of two: their mean)

        steps = paired_ratio([q["images_per_second"] for q in self.pipeline_history],
                             [p["images_per_second"] for p in self.plain_history])
        wall = paired_ratio(epoch_walls(self.plain_history), epoch_walls(self.pipeline_history))
        end = (self.plain_seconds / self.pipeline_seconds if self.plain_seconds and self.pipeline_seconds
               else None)
        return {"steps img/s": steps, "per-epoch wall": wall, "end to end": end}


# ------------------------------------------------------------------------------------------- (a), (b)


def recipe_params(recipe: Recipe) -> Any:
    """The retrain flow's parameters of ``recipe`` (one worker with every core); the plain side takes its loop
    recipe from them too, so both sides train the same recipe by construction."""
    from flows.params import RetrainParams

    return RetrainParams(**recipe.params(), workers=1, model_name="quality-fashion-mnist", promote="never")


def plain_run(recipe: Recipe, cache_dir: Path) -> tuple[float, float, list[dict[str, float]]]:
    """The recipe as a plain script: data, ``build_model``, ``fit``, test. (accuracy, seconds, history)."""
    import torch

    from infra.data.load import load_raw
    from infra.data.spec import prepare
    from infra.training.worker import StepClock
    from models import build_model
    from models.loop import FitHooks, fit
    from tasks.evaluate import evaluate_split

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    params = recipe_params(recipe)  # data, model and loop recipe exactly as the retrain flow builds them
    spec = params.data_spec()
    data = prepare(load_raw(spec, cache_dir), spec)
    model = build_model(params.arch, data.num_classes, params.strategy, None, **params.head_options(),
                        seed=params.seed)
    cfg = params.train_config(params.strategy, data.num_classes).fit
    clock = StepClock()  # the same per-epoch step marks the Ray Train worker adds to its rows
    result = fit(model, cfg, data.train, data.val,
                 FitHooks(on_step=clock.tick, on_epoch=lambda end: end.row.update(clock.lap())))
    accuracy = evaluate_split(model, data.test, data.num_classes).accuracy
    return accuracy, time.perf_counter() - started, result.history


def pipeline_run(recipe: Recipe) -> tuple[float, float, str, list[dict[str, float]]]:
    """The recipe through the ``retrain`` flow, one Ray Train worker with every core. (accuracy, s, run URL,
    the worker's per-epoch rows)."""
    from flows.retrain import retrain

    params = recipe_params(recipe)
    started = time.perf_counter()
    result = retrain(params)
    return result.test_accuracy, time.perf_counter() - started, result.run_url, result.history


def step_cores(cpu: ServiceCpu, history: list[dict[str, float]]) -> dict[str, float]:
    """Cores per process group over the run's steps, highest first, rounded to 0.01 (the worker's
    ``first_step_at`` of the first epoch to ``last_step_at`` of the last: validation and checkpoints between
    epochs inside, start-up and publication outside)."""
    if not history or not history[0].get("first_step_at") or not history[-1].get("last_step_at"):
        return {}
    used = cpu.cores((history[0]["first_step_at"], history[-1]["last_step_at"]))
    return {group: round(cores, 2) for group, cores in sorted(used.items(), key=lambda kv: -kv[1])}


# ------------------------------------------------------------------------------------------- (c)


def _phase_histories(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    """(phase, train_loss) per epoch of a child run, from MLflow's metric history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    phases = {m.step: int(m.value) for m in client.get_metric_history(run_id, "phase")}
    return [(phases[step], losses[step]) for step in sorted(losses)]


def demo_checks(table: list[dict[str, Any]], children: dict[str, list[str]], tracking_uri: str
                ) -> list[dict[str, Any]]:
    """Each two-phase schedule against its shape's linear probe, and its phase-2 start against phase 1's end."""
    means = {row["strategy"]: float(str(row["test acc [95% CI]"]).split()[0]) for row in table}
    checks = []
    for name in means:
        shape, _, schedule = name.partition("+")
        if schedule not in ("lp-ft", "gradual"):
            continue
        ratios = []
        for run_id in children.get(name, []):
            epochs = _phase_histories(tracking_uri, run_id)
            probe_last = [loss for phase, loss in epochs if phase == 1][-1]
            ft_first = next(loss for phase, loss in epochs if phase == 2)
            ratios.append(ft_first / probe_last)
        probe = f"{shape}+linear-probe"
        check: dict[str, Any] = {"strategy": name, "mean test acc": means[name],
                                 "max phase-2 loss / phase-1 loss": max(ratios) if ratios else None,
                                 "loss ok": bool(ratios) and max(ratios) <= PROBE_LOSS_RATIO}
        if probe in means:
            check |= {"linear probe": probe, "probe mean test acc": means[probe],
                      "not below probe": means[name] >= means[probe] - PROBE_TOLERANCE}
        checks.append(check)
    return checks


def source_bn_ablation(weights_path: str, study: DemoStudy, target: dict[str, Any], cache_dir: Path
                       ) -> list[dict[str, Any]]:
    """LP-FT on the demo's transfer task in one process, with the probe on target vs source BN statistics."""
    import torch

    from infra.data.load import load_raw
    from infra.data.spec import DataSpec, prepare
    from models import build_model
    from models.loop import FitConfig, fit
    from tasks.evaluate import evaluate_split

    torch.set_num_threads(os.cpu_count() or 1)
    spec = DataSpec(classes=target["classes"], limit=target["limit"], test_limit=target["test_limit"],
                    image_size=target["image_size"])
    data = prepare(load_raw(spec, cache_dir), spec)
    rows = []
    for strategy in ("replace-fc+lp-ft", "mlp+lp-ft"):
        for mode in ("target", "source"):
            accuracies, ratios = [], []
            for seed in range(study.ablation_seeds or study.seeds):
                model = build_model("resnet18", data.num_classes, strategy, weights_path, seed=seed)
                cfg = FitConfig(schedule="lp-ft", epochs=target["epochs"], batch_size=target["batch_size"],
                                lr=target["lr"], seed=seed, probe_bn_stats=mode)
                history = fit(model, cfg, data.train, data.val).history
                ratios.append(history[1]["train_loss"] / history[0]["train_loss"])
                accuracies.append(evaluate_split(model, data.test, data.num_classes).accuracy)
            rows.append({"strategy": strategy, "probe BN statistics": mode,
                         "mean test acc": sum(accuracies) / len(accuracies),
                         "phase-2 / phase-1 train loss": max(ratios)})
    return rows


def demo_study(study: DemoStudy, settings: Any, figures: QualityFigures) -> None:
    from flows.compare import compare_heads
    from flows.params import DEMO_SOURCE, DEMO_TARGET, CompareParams, RetrainParams
    from flows.retrain import retrain
    from infra.tracking.runs import run_children
    from tasks.build import resolve_weights

    source = retrain(RetrainParams(**(DEMO_SOURCE | dict(study.source))))
    target = {k: v for k, v in (DEMO_TARGET | dict(study.target)).items() if k != "seeds"}
    result = compare_heads(CompareParams(**target, weights=source.s3_uri, strategies=list(study.strategies),
                                         seeds=study.seeds))
    figures.demo_table, figures.demo_verdict, figures.demo_parent_url = (result.table, result.verdict,
                                                                         result.parent_run_url)
    assert settings.mlflow_tracking_uri
    children = run_children(settings.mlflow_tracking_uri, result.parent_run_id)
    figures.demo_checks = demo_checks(result.table, children, settings.mlflow_tracking_uri)
    local = resolve_weights(source.s3_uri, settings)
    assert local is not None
    figures.source_bn_ablation = source_bn_ablation(local, study, target, settings.cache_dir)


# ------------------------------------------------------------------------------------------- report


def summary_lines(f: QualityFigures) -> list[str]:
    def acc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def mins(v: float | None) -> str:
        return "n/a" if v is None else f"{v / 60:.1f} min"

    def ratio(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f} ({'met' if v >= GOAL_RATIO else 'NOT met'})"

    gap = f.gap()
    r, ratios = f.recipe, f.ratios()
    end = "n/a" if ratios["end to end"] is None else f"{ratios['end to end']:.3f}"
    lines = [f"(a) recipe: resnet18 {r.get('strategy')} from random init, {r.get('image_size')} px, "
             f"{r.get('epochs')} epochs, batch {r.get('batch_size')}, lr {r.get('lr')} (warm-up "
             f"{r.get('warmup_epochs')} epochs + cosine), augment {r.get('augment')}, label smoothing "
             f"{r.get('label_smoothing')}, seed {r.get('seed')}",
             f"    plain script (models.loop.fit)     test acc {acc(f.plain_accuracy)}  wall {mins(f.plain_seconds)}",
             f"    retrain flow (Ray + MLflow + S3)   test acc {acc(f.pipeline_accuracy)}  wall "
             f"{mins(f.pipeline_seconds)}",
             f"    |difference| {('n/a' if gap is None else f'{100 * gap:.2f} points')} (goal <= "
             f"{100 * GOAL_GAP:.1f}): {'met' if gap is not None and gap <= GOAL_GAP else 'NOT met'}",
             f"    steps img/s, pipeline / plain: {ratio(ratios['steps img/s'])}; per-epoch wall, plain / "
             f"pipeline: {ratio(ratios['per-epoch wall'])} (goals >= {GOAL_RATIO}); end to end, plain / "
             f"pipeline: {end}"]
    b = f.best_recipe
    lines.append(f"(b) best recipe at {b.get('epochs', 'n/a')} epochs: test acc {acc(f.best_accuracy)} (goal >= "
                 f"{GOAL_ACCURACY}): {'met' if (f.best_accuracy or 0.0) >= GOAL_ACCURACY else 'NOT met'}; wall "
                 f"{mins(f.best_seconds)}")
    if f.demo_checks:
        probe_ok = all(c.get("not below probe", True) for c in f.demo_checks)
        loss_ok = all(c["loss ok"] for c in f.demo_checks)
        lines.append(f"(c) demo comparison: {f.demo_verdict}")
        lines.append(f"    no two-phase schedule below its own probe - 1 point: {'met' if probe_ok else 'NOT met'}; "
                     f"phase-2 first-epoch loss <= {PROBE_LOSS_RATIO}x probe's last: "
                     f"{'met' if loss_ok else 'NOT met'}")
    return lines


def limits(f: QualityFigures) -> str:
    """How long (b)'s ten epochs took here, from its own epochs (its budget is epochs, not minutes)."""
    if not f.best_history:
        return "(b) was not run."
    rates = [r["images_per_second"] for r in f.best_history]
    rate = sum(rates) / len(rates)
    epoch_s = sum(r["epoch_seconds"] for r in f.best_history) / len(f.best_history)
    return (f"Wall time here: ResNet-18 at {f.best_recipe.get('image_size')} px trained at {rate:.0f} img/s on "
            f"these cores, {epoch_s / 60:.1f} minutes per epoch over the training images, "
            f"{(f.best_seconds or 0) / 60:.0f} minutes for the {len(f.best_history)} epochs with data preparation "
            "and evaluation. The published ResNet-18 figure for Fashion-MNIST (0.949) comes from far longer "
            f"training. Its epochs, the same loop on the same data, ran at {min(rates):.0f} to {max(rates):.0f} "
            f"img/s ({min(rates) / max(rates):.2f} of the fastest): the host's own drift from one minute to the "
            "next, which (a)'s per-epoch ratios carry too.")


def beside_worker(f: QualityFigures) -> str:
    """What the other processes took from the cores during the retrain flow's steps (the plain loop has the
    machine to itself), from ``pipeline_step_cores``."""
    from bench.sampling import TRAINING_WORKER as worker

    if worker not in f.pipeline_step_cores:
        return ""
    others = sum(c for g, c in f.pipeline_step_cores.items() if g != worker)
    cores = f.machine.get("cores") or 1
    return (f"Beside the training worker ({f.pipeline_step_cores[worker]:.2f} cores), the other processes used "
            f"{others:.2f} cores together, {100 * others / cores:.0f} % of this machine's {cores}: Ray's, the "
            "stack's services' and Train's own helpers' background work, each waking for milliseconds, while the "
            "plain loop's process had the machine to itself.")


def write_doc(f: QualityFigures, command: str, seconds: float, path: Path = QUALITY_DOC) -> None:
    from bench.report import epoch_table, md_table

    machine = f.machine
    body = [
        "# Quality benchmark",
        "",
        f"Reproduce with `{command}` (about {seconds / 60:.0f} minutes here). It runs everything below in one "
        f"process, one part after the other, and rewrites this file. Machine: {machine.get('cores')} cores "
        f"({machine.get('cpu')}), torch {machine.get('torch')}, Python {machine.get('python')}.",
        "",
        "```",
        *summary_lines(f),
        "```",
        "",
        "## (a) the pipeline against a plain script, on all of Fashion-MNIST",
        "",
        "Both sides run the same function, `models.loop.fit`, on the same split (54,000 train, 6,000 val, the "
        "full 10,000-image test set at the recipe's size), from the same seeded initial weights and in the same "
        "seeded data order; the pipeline adds Ray Train (one worker with every core), per-epoch MLflow logging and "
        "S3 checkpoints (uploaded while the next epoch trains), and publishes the model. Wall times include data "
        "preparation; the pipeline's also includes starting Ray, evaluation, plots and publication. The pipeline "
        "side's MLflow run is in the experiment `headbench`, tagged `model_name=quality-fashion-mnist`. An epoch's "
        "wall time runs from its first step to the next epoch's first step, so the last epoch has none.",
        "",
        "Plain side, per epoch:",
        "",
        md_table(epoch_table(f.plain_history)),
        "Retrain flow, per epoch (the Ray Train worker's own rows):",
        "",
        md_table(epoch_table(f.pipeline_history)),
        "Cores each process group used during the retrain flow's steps (its first step to its last, validation "
        "and checkpoints included; sampled from /proc every few seconds, this machine has "
        f"{machine.get('cores')}):",
        "",
        md_table([{"process group": g, "cores": c} for g, c in f.pipeline_step_cores.items()]),
        beside_worker(f),
        "",
        "## (b) the best recipe at 10 epochs",
        "",
        f"Recipe: {', '.join(f'{k} {v}' for k, v in f.best_recipe.items())}; the plain loop, on the same data as "
        "(a).",
        "",
        md_table(epoch_table(f.best_history)),
        limits(f),
        "",
        "## (c) the demo comparison (compare-heads flow)",
        "",
        "Source: ResNet-18 + `mlp` on classes 0-4 from random init, published; target: classes 5-9 (500 images, "
        "32 px, 2 epochs) from its backbone; the parent run is the newest `compare-heads` run of the experiment.",
        "",
        md_table(f.demo_table),
        f"Verdict: {f.demo_verdict}",
        "",
        "Two-phase schedules against their own probe phase:",
        "",
        md_table(f.demo_checks),
        "Why the probe uses target BatchNorm statistics: the same LP-FT on the same task in one process "
        "(`models.loop.fit`, same seeds), with the probe trained on features normalised by the source model's "
        "running statistics (`probe_bn_stats=source`) or by statistics re-estimated on the target training "
        "images (`target`, the default). The last column is the largest ratio over seeds of the first "
        "fine-tuning epoch's train loss to the probe's last (above 1: fine-tuning started by undoing the probe).",
        "",
        md_table(f.source_bn_ablation),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body) + "\n")


def machine_facts() -> dict[str, Any]:
    import torch

    from infra.processes.supervise import cpu_model

    return {"cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "python": platform.python_version()}


def run_quality(recipe: Recipe, study: DemoStudy | None, home: Path | None, *, plain: bool = True,
                pipeline: bool = True, best: Recipe | None = None, log: Any = print) -> QualityFigures:
    from bench.run import local_stack

    figures = QualityFigures(machine=machine_facts(), recipe=recipe.params())
    with local_stack(home) as settings:  # the stack's settings exported, before prefect is imported
        if plain:
            figures.plain_accuracy, figures.plain_seconds, figures.plain_history = plain_run(recipe, settings.cache_dir)
            log(f"(a) plain script: test acc {figures.plain_accuracy:.4f} in {figures.plain_seconds:.0f} s")
        if pipeline:
            from bench.sampling import ServiceCpu

            with ServiceCpu(settings.home).sampling() as cpu:
                if recipe.limit:  # a subset's steps last seconds: sample every STARTUP_SAMPLE_S throughout
                    cpu.fast(math.inf)
                (figures.pipeline_accuracy, figures.pipeline_seconds, figures.pipeline_run_url,
                 figures.pipeline_history) = pipeline_run(recipe)
            figures.pipeline_step_cores = step_cores(cpu, figures.pipeline_history)
            log(f"(a) retrain flow: test acc {figures.pipeline_accuracy:.4f} in {figures.pipeline_seconds:.0f} s")
        if best is not None:
            figures.best_recipe = best.params()
            figures.best_accuracy, figures.best_seconds, figures.best_history = plain_run(best, settings.cache_dir)
            log(f"(b) best recipe: test acc {figures.best_accuracy:.4f} in {figures.best_seconds:.0f} s")
        if study is not None:
            demo_study(study, settings, figures)
            log(f"(c) demo comparison: {figures.demo_verdict}")
    return figures


# the figures of each part, kept from --json by a run that leaves the part out
PART_FIGURES = {
    "a": ("recipe", "plain_accuracy", "plain_seconds", "plain_history", "pipeline_accuracy", "pipeline_seconds",
          "pipeline_run_url", "pipeline_history", "pipeline_step_cores"),
    "b": ("best_recipe", "best_accuracy", "best_seconds", "best_history"),
    "c": ("demo_table", "demo_verdict", "demo_parent_url", "demo_checks", "source_bn_ablation"),
}


@dataclass(frozen=True)
class QualityArgs:
    """The options of `python -m bench quality` (bench/cli.py)."""

    tiny: bool = False
    epochs: int | None = None
    no_demo: bool = False
    no_best: bool = False
    demo_only: bool = False
    home: Path | None = None
    json: Path = Path("bench/quality.json")
    doc: Path = QUALITY_DOC
    report_only: bool = False

    def skipped_parts(self) -> set[str]:
        """The parts ((a) pipeline vs plain, (b) best recipe, (c) demo) this run leaves out."""
        return ({"a", "b"} if self.demo_only else set()) | ({"b"} if self.no_best else set()) | \
            ({"c"} if self.no_demo else set())

    def command(self) -> str:
        """The command that reproduces this report, as the report prints it."""
        if not (self.tiny or self.epochs):
            return "make quality"  # a partial rerun keeps the other parts' figures: together, `make quality`
        return "python -m bench quality" + (" --tiny" if self.tiny else "") + \
            (f" --epochs {self.epochs}" if self.epochs else "") + (" --no-demo" if self.no_demo else "") + \
            (" --no-best" if self.no_best else "") + (" --demo-only" if self.demo_only else "")


def main(args: QualityArgs) -> int:
    if args.report_only:
        saved = json.loads(args.json.read_text())
        seconds = saved.pop("seconds", 0.0)
        write_doc(QualityFigures(**saved), "make quality", seconds, args.doc)
        print(f"report: {args.doc} (from {args.json})")
        return 0
    # tiny: two epochs, so that (a) has one epoch with a next one (a wall time)
    recipe = Recipe(limit=600, test_limit=200, epochs=2, batch_size=32, lr=0.05) if args.tiny else Recipe()
    if args.epochs:
        recipe = Recipe(**(recipe.params() | {"epochs": args.epochs}))
    # one seed: the two children (one CPU each) train in one wave on the bench's private Ray
    tiny_study = DemoStudy(("replace-fc+linear-probe", "replace-fc+lp-ft"), 1,
                           source=(("limit", 300), ("test_limit", 60), ("epochs", 1), ("workers", 1)),
                           target=(("limit", 120), ("test_limit", 60)))
    study = None if args.no_demo else tiny_study if args.tiny else DemoStudy()
    started = time.perf_counter()
    home = args.home or (Path(os.environ["HEADBENCH_HOME"]) if "HEADBENCH_HOME" in os.environ else None)
    skipped = args.skipped_parts()
    best = None if "b" in skipped or args.tiny else BEST_RECIPE  # tiny: (a)'s plain side runs the same code
    figures = run_quality(recipe, study, home, plain="a" not in skipped, pipeline="a" not in skipped, best=best)
    seconds = time.perf_counter() - started
    if skipped and args.json.exists():  # the parts not rerun keep their last figures
        old = json.loads(args.json.read_text())
        for key in (key for part in sorted(skipped) for key in PART_FIGURES[part]):
            setattr(figures, key, old.get(key, getattr(figures, key)))
        seconds += old.get("seconds", 0.0)
    print("\n".join(summary_lines(figures)), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(figures) | {"seconds": seconds}, indent=2))
    write_doc(figures, args.command(), seconds, args.doc)
    print(f"figures: {args.json}, report: {args.doc} (quality benchmark took {seconds:.0f} s)")
    return 0
