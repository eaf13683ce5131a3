"""The pipeline benchmark: what Prefect + Ray Train + MLflow + S3 cost over a plain PyTorch loop.

Everything runs in ONE process tree on the same data, model, batch and image size:

- B1  the same training loop (``models.loop.fit``) called in this process: no Ray, Prefect or MLflow, all
      cores, steady-state img/s from epochs 2..;
- Ray alone (``--ray-alone``): the function every Ray Train worker runs (``infra.training.worker.train_worker``,
      the same loop plus rank 0's per-epoch checkpoint) on a private Ray, checkpoints on local disk, no
      Prefect, MLflow or S3: what Ray Train costs by itself, and the one B2-like figure on a machine with
      PyTorch and Ray but none of the servers (a GPU box);
- B2  the `retrain` flow (Ray Train workers, rank-0 MLflow logging per epoch, S3 checkpoints), steady-state
      img/s from epochs 2.. of each run, and its fixed costs: flow start -> first optimizer step and last
      optimizer step -> model published;
- the linear probe with cached backbone features vs recomputing them every epoch (same epochs);
- the data loader alone (batches as training consumes them, no model);
- peak memory of every Ray Train worker (VmHWM, and USS = pages no other process shares) and of the driver.

Each figure is the median of ``repeats`` runs; B1 and what is compared with it (B2, Ray alone; torch DDP and
Ray DDP) run in alternating pairs, and each ratio is the median of the pairs' ratios, so that the host's
speed, which drifts from minute to minute on a shared machine, is the same on both sides of every ratio.
Prints a table and writes JSON. Not a test: the tests only
check that a tiny setting emits every figure.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import steady_epoch_wall, steady_img_s
from bench.config import BenchConfig, Figures, machine_facts
from bench.ddp import b1_ddp
from bench.report import table
from bench.sampling import Sampler, ServiceCpu, WorkerMemory
from infra.processes.supervise import memory_kb
from infra.settings import STANDARD_VARIABLES

# ------------------------------------------------------------------------------------------- data


def bench_data(cfg: BenchConfig, cache_dir: Path) -> Any:
    """Fashion-MNIST, all 10 classes, ``train_images`` for training (+10% val), resized once."""
    from infra.data.load import load_raw
    from infra.data.spec import DataSpec, prepare

    spec = DataSpec(limit=int(cfg.train_images / 0.9) + 10, test_limit=200, image_size=cfg.image_size)
    return prepare(load_raw(spec, cache_dir), spec)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- B1


def b1_plain(cfg: BenchConfig, train: Any, val: Any, *, compiled: bool = False) -> float:
    """Steady img/s of ``b1_history``."""
    return steady_img_s(b1_history(cfg, train, val, compiled=compiled))


def b1_history(cfg: BenchConfig, train: Any, val: Any, *, compiled: bool = False) -> list[dict[str, float]]:
    """Plain PyTorch: ``models.loop.fit``, the loop every Ray Train worker runs, called in this process with
    the same model, batch, optimizer and inputs as B2 and no Ray, Prefect or MLflow; its rows carry the same
    step marks as a Train worker's (``StepClock``), so that per-epoch wall times compare too."""
    import torch

    from infra.training.worker import StepClock
    from models import build_model
    from models.loop import FitConfig, FitHooks, fit

    device = torch.device("cuda" if cfg.gpu else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg.arch, 10, "replace-fc", None, seed=0).to(device)
    if cfg.gpu:
        model = model.to(memory_format=torch.channels_last)
    clock = StepClock()
    hooks = FitHooks(device=device, wrap_model=torch.compile if compiled else (lambda m: m),
                     autocast_dtype=torch.bfloat16 if cfg.gpu else None, channels_last=cfg.gpu, pin_memory=cfg.gpu,
                     on_step=clock.tick, on_epoch=lambda end: end.row.update(clock.lap()))
    result = fit(model, FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=0.01, precise_bn_batches=0),
                 train, val, hooks)
    return result.history


def ray_alone(cfg: BenchConfig, train: Any, val: Any, run: int, workers: int = 1) -> float:
    """The worker function of B2 (``train_worker``: ``models.loop.fit`` under Ray Train, rank 0 writing a
    checkpoint each epoch) on one Train worker with every core (and the GPU with ``gpu``), or on ``workers``
    DDP workers of 1 CPU each, on the Ray this process already uses or a private one, checkpoints in a local
    folder. Steady img/s as B2's."""
    from infra.processes.interrupts import fit_interruptibly
    from infra.settings import load_settings
    from infra.training.cluster import Resources, init_ray
    from infra.training.trainer import build_trainer, final_checkpoint
    from infra.training.worker import TrainConfig
    from models import build_model
    from models.loop import FitConfig

    with tempfile.TemporaryDirectory(prefix="headbench-ray-alone-") as tmp:
        # a no-op when this process already uses a Ray; before anything imports ray (its auth mode, init_ray)
        init_ray(load_settings(Path(tmp)).model_copy(update={"ray_address": None}))
        from ray.train import RunConfig

        cpus = (os.cpu_count() or 1) if workers == 1 else 1
        train_cfg = TrainConfig(arch=cfg.arch, strategy="replace-fc", num_classes=10,
                                fit=FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=0.01,
                                              precise_bn_batches=0),
                                resources=Resources(workers=workers, cpus_per_worker=cpus, use_gpu=cfg.gpu))
        init = build_model(cfg.arch, 10, "replace-fc", None, seed=0).state_dict()
        trainer = build_trainer(train_cfg, train, val, init, cpus,
                                RunConfig(name=f"ray-alone-{workers}x-{run}", storage_path=tmp))
        # not trainer.fit() on this (main) thread: its SIGINT handler would outlive the run (fit_interruptibly)
        _, state = final_checkpoint(fit_interruptibly(trainer))
    return steady_img_s(state.history)


# ------------------------------------------------------------------------------------------- loader, probe


def loader_rate(cfg: BenchConfig, train: Any) -> float:
    """The input pipeline alone, as each training step consumes it: shuffle and collate uint8 batches, move
    them to the training device, flip and normalise there. img/s."""
    import torch

    from models.augment import image_input
    from models.data import ArrayDataset

    device = torch.device("cuda" if cfg.gpu else "cpu")
    loader = torch.utils.data.DataLoader(ArrayDataset(train), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, pin_memory=cfg.gpu)
    prepare = image_input(channels_last=cfg.gpu)
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        prepare(images.to(device, non_blocking=True), True)
        n += images.shape[0]
    if cfg.gpu:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def probe_times(cfg: BenchConfig, train: Any) -> tuple[float, float]:
    """Linear probe for ``probe_epochs``: (seconds with features computed once, seconds recomputing them)."""
    import torch
    from torch import nn

    from models import build_model
    from models.augment import feature_input
    from models.data import ArrayDataset, ArraySplit
    from models.loop import extract_features, train_one_epoch

    device = torch.device("cuda" if cfg.gpu else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    split = ArraySplit(train.images[:cfg.probe_images], train.labels[:cfg.probe_images])
    loss_fn = nn.CrossEntropyLoss()

    def fresh() -> tuple[Any, torch.optim.Optimizer]:
        model = build_model(cfg.arch, 10, "replace-fc+linear-probe", None).to(device)
        return model, torch.optim.SGD(model.head.parameters(), lr=0.01, momentum=0.9)

    def cached() -> None:
        model, opt = fresh()
        feats = extract_features(model.backbone, torch.from_numpy(split.images), device)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(feats, torch.from_numpy(split.labels)),
                                             batch_size=cfg.batch_size, shuffle=True)
        for _ in range(cfg.probe_epochs):
            train_one_epoch(model.head, loss_fn, opt, loader, device, prepare=feature_input)

    def uncached() -> None:
        model, opt = fresh()
        loader = torch.utils.data.DataLoader(ArrayDataset(split), batch_size=cfg.batch_size, shuffle=True)
        for _ in range(cfg.probe_epochs):
            train_one_epoch(model, loss_fn, opt, loader, device, frozen=(model.backbone,))

    return _timed(cached), _timed(uncached)


# ------------------------------------------------------------------------------------------- B2


# The start-up of a run, in order: each segment ends at its mark (flow stages, ``infra.training.timeline`` marks on the
# driver, and the worker's own clock from the first epoch's row). The Train worker's process is not on this
# path where it was prestarted (``infra.training.prestart``): it starts, and imports, beside the segments from
# "worker processes asked for" on; WORKER_PROCESS_MARKS say when, from flow start.
STARTUP_SEGMENTS = (
    ("data task", "build"), ("build task", "train"), ("MLflow run, params, datasets", "ray-connect"),
    ("connect to Ray", "ray-connected"), ("placement check, worker processes asked for", "workers-prestarted"),
    ("trainer, ray.put", "fit-called"),
    ("Train controller, worker group, process group", "worker_entered_at"),
    ("worker: data from the object store, model (and a resume checkpoint)", "worker_ready_at"),
    ("first optimizer step", "first_step_at"),
)
# The end of a run, from its last optimizer step to the model published and registered ("promote" is announced
# once the publish task has returned)
END_SEGMENTS = (
    ("last epoch's report and checkpoint upload, Train's shutdown", "fit-returned"),
    ("final weights from the checkpoint in S3", "final-weights"),
    ("train task's return (MLflow history sync)", "evaluate"),
    ("evaluate task (test set, plots to MLflow)", "publish"),
    ("publish task (safetensors to S3, MLflow model, registry)", "promote"),
)
WORKER_PROCESS_MARKS = (("worker process started (from flow start)", "worker_started_at"),
                        ("worker process imports done (from flow start)", "worker_preloaded_at"))


@dataclass
class B2Run:
    img_s: float  # steady: median over epochs 2..
    epoch_wall_s: float | None  # steady: an epoch's first step to the next's (steps, validation, checkpoint)
    to_first_step_s: float
    to_published_s: float  # last optimizer step -> model published and registered
    startup: dict[str, float]  # segment -> seconds (STARTUP_SEGMENTS)
    end: dict[str, float]  # segment -> seconds (END_SEGMENTS): last step -> published
    steady_window: tuple[float, float]  # wall clock of the steady epochs (service CPU is measured there)
    startup_window: tuple[float, float]  # wall clock from flow start to the first optimizer step


def segments(marks: dict[str, float], start: float, spec: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Seconds of each (label, mark) of ``spec`` that was marked, each from the mark before it (from ``start``)."""
    out, previous = {}, start
    for label, key in spec:
        if key in marks:
            out[label] = marks[key] - previous
            previous = marks[key]
    return out


def b2_pipeline(cfg: BenchConfig, settings: Any, model_name: str, workers: int | None = None,
                cpus_per_worker: int | None = None, checkpoint_upload: str = "async") -> B2Run:
    """One `retrain` flow run in this process, with its start-up breakdown."""
    from flows import retrain as retrain_module
    from flows.params import RetrainParams
    from flows.stages import listening
    from infra.tracking.epochs import STARTUP_KEYS
    from infra.training.timeline import recording

    params = RetrainParams(
        limit=int(cfg.train_images / 0.9) + 10, test_limit=200, image_size=cfg.image_size, arch=cfg.arch,
        strategy="replace-fc", epochs=cfg.epochs, batch_size=cfg.batch_size, precise_bn_batches=0,
        workers=workers or cfg.workers, cpus_per_worker=cpus_per_worker or cfg.cpus_per_worker, use_gpu=cfg.gpu,
        model_name=model_name, checkpoint_upload=checkpoint_upload,
        promote="never")
    marks: dict[str, float] = {}

    def mark(name: str, at: float | None = None) -> None:
        marks.setdefault(name, at or time.time())

    with listening(mark), recording(mark):
        started = time.time()
        result = retrain_module.retrain(params)
    history = result.history
    first = history[0]
    marks.update({k: first[k] for k in (*STARTUP_KEYS, "first_step_at") if k in first})
    startup = segments(marks, started, STARTUP_SEGMENTS)
    startup |= {label: marks[key] - started for label, key in WORKER_PROCESS_MARKS if key in marks}
    end = segments(marks, history[-1]["last_step_at"], END_SEGMENTS)
    window = (history[1]["last_step_at"] - history[1]["epoch_seconds"] if len(history) > 1 else first["first_step_at"],
              history[-1]["last_step_at"])
    # "promote" is announced right after the publish task returned: the model is in S3 and registered
    return B2Run(steady_img_s(history), steady_epoch_wall(history), first["first_step_at"] - started,
                 marks["promote"] - history[-1]["last_step_at"], startup, end, window,
                 (started, first["first_step_at"]))


# ------------------------------------------------------------------------------------------- driver


@contextmanager
def local_stack(home: Path | None) -> Iterator[Any]:
    """The stack at ``home`` when it is up, else a private one on free ports, stopped afterwards; its settings
    in this process's environment (the standard variables, before Prefect is imported), so that the flows
    this process runs, which load their settings themselves, use this stack and nothing else: a leftover
    shell's variables are dropped and HEADBENCH_HOME names the stack (never an env file of a stack that once
    ran in the current directory).

    The benchmarks train on a private Ray this process starts, also when the stack has a cluster: the Ray
    workers are then this process's descendants (memory sampling) and share the cores with nothing else. An
    empty RAY_ADDRESS outranks the stack's env file."""
    from infra.processes.interrupts import shielded, sigterm_as_interrupt
    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    def use(stack_home: Path) -> Any:
        for key in STANDARD_VARIABLES:
            os.environ.pop(key, None)
        os.environ["RAY_ADDRESS"] = ""
        os.environ["HEADBENCH_HOME"] = str(stack_home)
        settings = load_settings(stack_home)
        settings.export_env()
        return settings

    if home is not None and all(s.healthy for s in LocalStack(load_settings(home)).status()):
        yield use(home)
        return
    tmp = Path(tempfile.mkdtemp(prefix="headbench-bench-"))
    stack = LocalStack(load_settings(tmp), free_ports())
    try:
        with sigterm_as_interrupt():  # `kill` of the bench, too, stops this stack below
            stack.up()
            yield use(tmp)
    finally:
        with shielded():  # a second Ctrl-C must not leave servers running
            stack.down()
            shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: BenchConfig, home: Path | None = None, log: Callable[[str], None] = print) -> Figures:
    os.environ.update(dict(cfg.env))  # a knob under test: before the stack, Ray or any worker starts
    figures = Figures(machine=machine_facts(cfg), config=asdict(cfg))
    if cfg.b1_only:  # no stack, no Ray: the loop, its input pipeline and (--compile) torch.compile
        data = bench_data(cfg, (home or Path(".headbench")) / "cache")
        log(f"data: {len(data.train)} training images at {cfg.image_size} px; machine {figures.machine}")
        for i in range(cfg.repeats):
            figures.loader_img_s.append(loader_rate(cfg, data.train))
            figures.b1_img_s.append(b1_plain(cfg, data.train, data.val))
            log(f"[{i + 1}/{cfg.repeats}] loader {figures.loader_img_s[-1]:.0f} img/s, "
                f"B1 plain PyTorch {figures.b1_img_s[-1]:.1f} img/s")
            _ray_alone_run(cfg, data, figures, i, log)  # paired with the B1 just before it
        for i in range(cfg.repeats if cfg.compile else 0):
            figures.b1_compiled_img_s.append(b1_plain(cfg, data.train, data.val, compiled=True))
            log(f"[{i + 1}/{cfg.repeats}] B1 torch.compile {figures.b1_compiled_img_s[-1]:.1f} img/s")
        return figures
    with local_stack(home) as settings:
        data = bench_data(cfg, settings.cache_dir)
        log(f"data: {len(data.train)} training images at {cfg.image_size} px; machine {figures.machine}")
        for i in range(0 if cfg.b2_only else cfg.repeats):
            figures.loader_img_s.append(loader_rate(cfg, data.train))
            log(f"[{i + 1}/{cfg.repeats}] loader {figures.loader_img_s[-1]:.0f} img/s")
        if cfg.compile:
            for i in range(cfg.repeats):
                figures.b1_compiled_img_s.append(b1_plain(cfg, data.train, data.val, compiled=True))
                log(f"[{i + 1}/{cfg.repeats}] B1 torch.compile {figures.b1_compiled_img_s[-1]:.1f} img/s")
        for i in range(0 if cfg.b2_only else cfg.repeats):
            cached, uncached = probe_times(cfg, data.train)
            figures.probe_cached_s.append(cached)
            figures.probe_uncached_s.append(uncached)
            log(f"[{i + 1}/{cfg.repeats}] linear probe x{cfg.probe_epochs} epochs: cached {cached:.1f} s, "
                f"uncached {uncached:.1f} s")
        with WorkerMemory().sampling() as memory, ServiceCpu(settings.home).sampling() as cpu:
            for i in range(cfg.repeats + 1):  # the first run also starts Ray: reported apart, as "cold"
                if i > 0:  # B1 right before each warm B2, as a pair: the same host speed and idle services
                    with Sampler.quiet():
                        b1 = b1_history(cfg, data.train, data.val)
                    figures.b1_img_s.append(steady_img_s(b1))
                    figures.b1_epoch_wall_s.append(steady_epoch_wall(b1) or 0.0)
                    log(f"[{i}] B1 plain PyTorch {figures.b1_img_s[-1]:.1f} img/s")
                # start-up CPU by process: sampled densely until a warm run has surely stepped (10-13 s on a
                # slow host), not into its steady epochs, whose cores are measured at the usual pace
                cpu.fast(20)
                b2 = b2_pipeline(cfg, settings, model_name="bench")
                if i == 0:
                    figures.cold_start_to_first_step_s = b2.to_first_step_s
                else:
                    figures.b2_img_s.append(b2.img_s)
                    figures.b2_epoch_wall_s.append(b2.epoch_wall_s or 0.0)
                    figures.start_to_first_step_s.append(b2.to_first_step_s)
                    figures.last_step_to_published_s.append(b2.to_published_s)
                    for label, seconds in b2.startup.items():
                        figures.startup_s.setdefault(label, []).append(seconds)
                    for label, seconds in b2.end.items():
                        figures.end_s.setdefault(label, []).append(seconds)
                    for group, cores in cpu.cores(b2.steady_window).items():
                        figures.service_cores.setdefault(group, []).append(cores)
                    for group, seconds in cpu.cpu_seconds(b2.startup_window).items():
                        figures.startup_cpu_s.setdefault(group, []).append(seconds)
                log(f"[{'cold' if i == 0 else i}] B2 headbench {b2.img_s:.1f} img/s, flow start -> first step "
                    f"{b2.to_first_step_s:.1f} s, last step -> published {b2.to_published_s:.1f} s")
                if i > 0 and cfg.sync_checkpoints:  # the same run with training waiting for each upload
                    sync = b2_pipeline(cfg, settings, model_name="bench", checkpoint_upload="sync")
                    figures.b2_sync_img_s.append(sync.img_s)
                    figures.b2_sync_epoch_wall_s.append(sync.epoch_wall_s or 0.0)
                    log(f"[{i}] B2 with synchronous checkpoints {sync.img_s:.1f} img/s, epoch wall "
                        f"{sync.epoch_wall_s or 0:.2f} s (asynchronous: {b2.epoch_wall_s or 0:.2f} s)")
                if i > 0:
                    _ray_alone_run(cfg, data, figures, i - 1, log)  # on the private Ray that B2 started
            for i in range(cfg.repeats if cfg.ddp_workers and not cfg.b2_only else 0):
                b2 = b2_pipeline(cfg, settings, "bench", workers=cfg.ddp_workers, cpus_per_worker=1)
                figures.b2_ddp_img_s.append(b2.img_s)
                figures.b1_ddp_img_s.append(b1_ddp(cfg.arch, cfg.batch_size, cfg.epochs, data.train, data.val,
                                                   world=cfg.ddp_workers))
                log(f"[{i + 1}/{cfg.repeats}] {cfg.ddp_workers} DDP workers x 1 CPU: Ray Train {b2.img_s:.1f} img/s, "
                    f"torch DDP {figures.b1_ddp_img_s[-1]:.1f} img/s")
                if cfg.ray_alone:
                    figures.ray_alone_ddp_img_s.append(ray_alone(cfg, data.train, data.val, i, cfg.ddp_workers))
                    log(f"[{i + 1}/{cfg.repeats}] {cfg.ddp_workers} DDP workers x 1 CPU, Ray Train alone "
                        f"{figures.ray_alone_ddp_img_s[-1]:.1f} img/s")
        figures.worker_peak_rss_mb = [kb / 1024 for kb in memory.peak_rss_kb.values()]
        figures.worker_peak_uss_mb = [kb / 1024 for kb in memory.peak_uss_kb.values()]
        figures.driver_peak_rss_mb = memory_kb(os.getpid())[0] / 1024
    return figures


def _ray_alone_run(cfg: BenchConfig, data: Any, figures: Figures, i: int, log: Callable[[str], None]) -> None:
    if cfg.ray_alone:
        figures.ray_alone_img_s.append(ray_alone(cfg, data.train, data.val, i))
        log(f"[{i + 1}/{cfg.repeats}] Ray Train alone {figures.ray_alone_img_s[-1]:.1f} img/s")


def main(*, tiny: bool = False, gpu: bool = False, compile: bool = False, b1_only: bool = False,
         b2_only: bool = False, ray_alone: bool = False, env: tuple[tuple[str, str], ...] = (),
         repeats: int | None = None, workers: int | None = None, image_size: int | None = None,
         home: Path | None = None, json_path: Path = Path("bench/results.json")) -> int:
    """`python -m bench`: run, print the table, write the figures as JSON."""
    cfg = BenchConfig.tiny() if tiny else BenchConfig.gpu_default() if gpu else BenchConfig()
    overrides = {"repeats": repeats, "workers": workers, "image_size": image_size, "compile": compile or None,
                 "b1_only": b1_only or None, "b2_only": b2_only or None, "ray_alone": ray_alone or None,
                 "env": env or None}
    cfg = BenchConfig(**(asdict(cfg) | {k: v for k, v in overrides.items() if v is not None}))
    started = time.perf_counter()
    figures = run(cfg, home or (Path(os.environ["HEADBENCH_HOME"]) if "HEADBENCH_HOME" in os.environ else None))
    print(table(figures), flush=True)
    result = {"summary": figures.summary(), "raw": asdict(figures), "seconds": time.perf_counter() - started}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"figures: {json_path} (bench took {result['seconds']:.0f} s)")
    return 0


def ddp_options_main(repeats: int, home: Path | None, json_path: Path) -> int:
    """`python -m bench ddp-options`: torch DDP 2 x 1 under each DDP option set, interleaved."""
    from bench.ddp import compare_options

    cfg = BenchConfig()
    data = bench_data(cfg, (home or Path(".headbench")) / "cache")
    rates = compare_options(cfg.arch, cfg.batch_size, cfg.epochs, data.train, data.val, repeats)
    base = statistics.median(rates["default"])
    for name, values in rates.items():
        print(f"{name:<28} {statistics.median(values):7.1f} img/s  {statistics.median(values) / base:.3f} of default  "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rates, indent=2))
    return 0
