"""The pipeline benchmark: what Prefect + Ray Train + MLflow + S3 cost over a plain PyTorch loop.

Everything runs in ONE process tree on the same data, model, batch and image size:

- B1  the same training loop (``models.loop.fit``) called in this process: no Ray, Prefect or MLflow, all
      cores, steady-state img/s from epochs 2..;
- Ray alone (``--ray-alone``): the function every Ray Train worker runs (``infra.ray_worker.train_worker``,
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

import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from bench import steady_img_s
from bench.ddp import b1_ddp
from infra.procs import cmdline, cpu_model, descendants, memory_kb, stat_fields
from infra.settings import STANDARD_VARIABLES

# ResNet-18 training at 224 px: ~1.82 GFLOP forward, x3 for forward + backward (He et al.; fvcore counts).
RESNET18_TRAIN_GFLOP_224 = 5.5
# Dense bf16 tensor-core peak of common accelerators, TFLOP/s, for the ratio to the FLOP limit.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "T4": 65.0}
# Training rates whose share of that limit a GPU run reports: summary key prefix -> table label
MFU_LABELS = {"b1_plain_pytorch": "B1", "b1_compiled": "B1 torch.compile", "ray_alone": "Ray Train alone",
              "b2_headbench": "B2"}


@dataclass(frozen=True)
class BenchConfig:
    arch: str = "resnet18"
    image_size: int = 64
    batch_size: int = 64
    train_images: int = 960  # per epoch
    epochs: int = 3  # B2 epochs per run; epoch 1 is warm-up, steady state is the median of the rest
    probe_epochs: int = 10
    probe_images: int = 640
    repeats: int = 3
    workers: int = 1  # B2: one worker with every core (no gradient all-reduce on a single machine)
    cpus_per_worker: int | None = None  # default: cores // workers
    ddp_workers: int = 2  # B2 again with this many 1-CPU workers (DistributedDataParallel); 0 = skip
    gpu: bool = False
    compile: bool = False  # also time B1 with torch.compile
    b1_only: bool = False  # no stack, no Ray: the plain PyTorch figure alone (e.g. a bare GPU machine)
    b2_only: bool = False  # B1 and B2 only (no loader, probe or DDP rows): a knob's effect, measured faster
    ray_alone: bool = False  # also the worker function on Ray Train alone (private Ray, no servers)
    env: tuple[tuple[str, str], ...] = ()  # set before the stack and Ray start, e.g. RAY_worker_niceness=15

    @classmethod
    def tiny(cls) -> BenchConfig:
        """For the test that checks every figure is emitted (seconds, not minutes)."""
        return cls(image_size=32, batch_size=32, train_images=128, epochs=2, probe_epochs=2,
                   probe_images=64, repeats=1, workers=1, ddp_workers=0)

    @classmethod
    def gpu_default(cls) -> BenchConfig:
        """One GPU, ResNet-18 at 224 px, bf16 autocast + channels_last: fits in under 5 minutes."""
        return cls(image_size=224, batch_size=256, train_images=256 * 24, epochs=3, repeats=3,
                   workers=1, cpus_per_worker=None, gpu=True, probe_images=4096, ddp_workers=0)


@dataclass
class Figures:
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    b1_img_s: list[float] = field(default_factory=list)
    b1_compiled_img_s: list[float] = field(default_factory=list)
    b2_img_s: list[float] = field(default_factory=list)
    ray_alone_img_s: list[float] = field(default_factory=list)
    ray_alone_ddp_img_s: list[float] = field(default_factory=list)  # ddp_workers x 1 CPU, Ray Train alone
    b2_ddp_img_s: list[float] = field(default_factory=list)  # ddp_workers x 1 CPU
    b1_ddp_img_s: list[float] = field(default_factory=list)  # torch DDP, ddp_workers processes x 1 thread
    startup_s: dict[str, list[float]] = field(default_factory=dict)  # segment -> warm runs (STARTUP_SEGMENTS)
    end_s: dict[str, list[float]] = field(default_factory=dict)  # segment -> warm runs (END_SEGMENTS)
    service_cores: dict[str, list[float]] = field(default_factory=dict)  # group -> cores during B2's steady epochs
    startup_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # group -> CPU-s, flow start -> first step
    start_to_first_step_s: list[float] = field(default_factory=list)  # warm runs (Ray already up)
    cold_start_to_first_step_s: float | None = None  # the first run, which also starts Ray
    last_step_to_published_s: list[float] = field(default_factory=list)
    probe_cached_s: list[float] = field(default_factory=list)
    probe_uncached_s: list[float] = field(default_factory=list)
    loader_img_s: list[float] = field(default_factory=list)
    worker_peak_rss_mb: list[float] = field(default_factory=list)
    worker_peak_uss_mb: list[float] = field(default_factory=list)
    driver_peak_rss_mb: float = 0.0

    def summary(self) -> dict[str, Any]:
        med = _median
        b1, b2 = med(self.b1_img_s), med(self.b2_img_s)
        out: dict[str, Any] = {
            "b1_plain_pytorch_img_s": b1, "b2_headbench_img_s": b2, "b2_over_b1": paired_ratio(self.b2_img_s,
                                                                                              self.b1_img_s),
            "b2_ddp_img_s": med(self.b2_ddp_img_s),
            "b2_ddp_over_b1": med(self.b2_ddp_img_s) / b1 if b1 and self.b2_ddp_img_s else None,
            "b1_ddp_img_s": med(self.b1_ddp_img_s),
            "ray_ddp_over_torch_ddp": paired_ratio(self.b2_ddp_img_s, self.b1_ddp_img_s),
            "startup_breakdown_s": {k: med(v) for k, v in self.startup_s.items()},
            "end_breakdown_s": {k: med(v) for k, v in self.end_s.items()},
            "service_cores": {k: med(v) for k, v in sorted(self.service_cores.items(), key=lambda kv: -med(kv[1]))},
            "startup_cpu_s": {k: med(v) for k, v in sorted(self.startup_cpu_s.items(), key=lambda kv: -med(kv[1]))},
            "flow_start_to_first_step_s": med(self.start_to_first_step_s),
            "cold_flow_start_to_first_step_s": self.cold_start_to_first_step_s,
            "last_step_to_published_s": med(self.last_step_to_published_s),
            "probe_cached_s": med(self.probe_cached_s), "probe_uncached_s": med(self.probe_uncached_s),
            "probe_speedup": (med(self.probe_uncached_s) / med(self.probe_cached_s)) if self.probe_cached_s else None,
            "loader_img_s": med(self.loader_img_s),
            "loader_over_training": med(self.loader_img_s) / b1 if b1 and self.loader_img_s else None,
            "worker_peak_rss_mb": max(self.worker_peak_rss_mb, default=None),
            "worker_peak_uss_mb": max(self.worker_peak_uss_mb, default=None),
            "driver_peak_rss_mb": self.driver_peak_rss_mb,
        }
        if self.b1_compiled_img_s:
            out["b1_compiled_img_s"] = med(self.b1_compiled_img_s)
        if self.ray_alone_img_s:
            out["ray_alone_img_s"] = med(self.ray_alone_img_s)
            out["ray_alone_over_b1"] = paired_ratio(self.ray_alone_img_s, self.b1_img_s)
        if self.ray_alone_ddp_img_s and self.b1_ddp_img_s:
            out["ray_alone_ddp_img_s"] = med(self.ray_alone_ddp_img_s)
            out["ray_alone_ddp_over_torch_ddp"] = paired_ratio(self.ray_alone_ddp_img_s, self.b1_ddp_img_s)
        if self.config.get("gpu"):
            flop = RESNET18_TRAIN_GFLOP_224 * (self.config["image_size"] / 224) ** 2 * 1e9
            peak = self.machine.get("peak_bf16_tflops")
            for name in MFU_LABELS:
                if out.get(f"{name}_img_s") and peak:
                    out[f"{name}_mfu"] = out[f"{name}_img_s"] * flop / (peak * 1e12)
        return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_ratio(numerators: list[float], denominators: list[float]) -> float | None:
    """The median of run-by-run ratios of two figures measured in alternating pairs (B1 then B2, torch DDP
    beside Ray DDP): each pair shares the host's speed of that minute, which drifts by more than the knobs
    under test move a ratio of medians."""
    pairs = [n / d for n, d in zip(numerators, denominators, strict=False) if d]
    return statistics.median(pairs) if pairs else None


# ------------------------------------------------------------------------------------------- machine


def machine_facts(cfg: BenchConfig) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "torch": torch.__version__, "python": platform.python_version(),
                             "cpu": cpu_model()}
    if cfg.gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        facts["gpu"] = name
        facts["peak_bf16_tflops"] = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return facts


# ------------------------------------------------------------------------------------------- memory


# How often the samplers read /proc. Reading a worker's USS walks its memory map (smaps_rollup), and the
# samplers run in the driver's process: once a second they cost B2 a few percent, so every 2 s.
SAMPLE_S = 2.0
STARTUP_SAMPLE_S = 0.5  # ServiceCpu while a run starts, for its CPU-seconds at the first step
TICKS = os.sysconf("SC_CLK_TCK")


class Sampler:
    """A thread of this process that calls ``sample()`` every SAMPLE_S while ``sampling()`` is open."""

    # set while B1 runs: B1 trains in this process, where the samplers' /proc reads would take interpreter
    # time from its loop that B2's worker, a process of its own, never loses to them
    _quiet = threading.Event()

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def interval(self) -> float:
        return SAMPLE_S

    def _loop(self) -> None:
        while not self._stop.wait(self.interval()):
            if not Sampler._quiet.is_set():
                self.sample()

    @contextmanager
    def sampling(self) -> Iterator[Self]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    @staticmethod
    @contextmanager
    def quiet() -> Iterator[None]:
        """No sample is taken by any sampler inside this block."""
        Sampler._quiet.set()
        try:
            yield
        finally:
            Sampler._quiet.clear()


class WorkerMemory(Sampler):
    """Samples this process tree's Ray Train workers (found by their process title) every SAMPLE_S:
    VmHWM is the kernel's own peak RSS; USS (Private_Clean + Private_Dirty) leaves out pages shared with
    other processes, e.g. the dataset in Ray's object store."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_rss_kb: dict[int, int] = {}
        self.peak_uss_kb: dict[int, int] = {}

    def sample(self) -> None:
        for proc in descendants(os.getpid()):
            if "TrainWorker" not in cmdline(proc.pid):
                continue
            rss, uss = memory_kb(proc.pid)
            self.peak_rss_kb[proc.pid] = max(self.peak_rss_kb.get(proc.pid, 0), rss)
            self.peak_uss_kb[proc.pid] = max(self.peak_uss_kb.get(proc.pid, 0), uss)


# ------------------------------------------------------------------------------------------- data


def bench_data(cfg: BenchConfig, cache_dir: Path) -> Any:
    """Fashion-MNIST, all 10 classes, ``train_images`` for training (+10% val), resized once."""
    from infra.datasets import DataSpec, prepare
    from infra.sources import load_raw

    spec = DataSpec(limit=int(cfg.train_images / 0.9) + 10, test_limit=200, image_size=cfg.image_size)
    return prepare(load_raw(spec, cache_dir), spec)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- B1


def b1_plain(cfg: BenchConfig, train: Any, val: Any, *, compiled: bool = False) -> float:
    """Plain PyTorch: ``models.loop.fit``, the loop every Ray Train worker runs, called in this process with
    the same model, batch, optimizer and inputs as B2 and no Ray, Prefect or MLflow. Steady img/s, measured
    as B2 is: the median over epochs 2.. of ``cfg.epochs``."""
    import torch

    from models import build_model
    from models.loop import FitConfig, FitHooks, fit

    device = torch.device("cuda" if cfg.gpu else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(cfg.arch, 10, "replace-fc", None, seed=0).to(device)
    if cfg.gpu:
        model = model.to(memory_format=torch.channels_last)
    hooks = FitHooks(device=device, wrap_model=torch.compile if compiled else (lambda m: m),
                     autocast_dtype=torch.bfloat16 if cfg.gpu else None, channels_last=cfg.gpu, pin_memory=cfg.gpu)
    result = fit(model, FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=0.01, precise_bn_batches=0),
                 train, val, hooks)
    return steady_img_s(result.history)


def ray_alone(cfg: BenchConfig, train: Any, val: Any, run: int, workers: int = 1) -> float:
    """The worker function of B2 (``train_worker``: ``models.loop.fit`` under Ray Train, rank 0 writing a
    checkpoint each epoch) on one Train worker with every core (and the GPU with ``gpu``), or on ``workers``
    DDP workers of 1 CPU each, on the Ray this process already uses or a private one, checkpoints in a local
    folder. Steady img/s as B2's."""
    from infra.interrupts import fit_interruptibly
    from infra.ray_cluster import init_ray
    from infra.ray_train import build_trainer, final_checkpoint
    from infra.ray_worker import TrainConfig
    from infra.settings import load_settings
    from models import build_model

    with tempfile.TemporaryDirectory(prefix="headbench-ray-alone-") as tmp:
        # a no-op when this process already uses a Ray; before anything imports ray (its auth mode, init_ray)
        init_ray(load_settings(Path(tmp)).model_copy(update={"ray_address": None}))
        from ray.train import RunConfig

        cpus = (os.cpu_count() or 1) if workers == 1 else 1
        train_cfg = TrainConfig(arch=cfg.arch, strategy="replace-fc", num_classes=10, epochs=cfg.epochs,
                                batch_size=cfg.batch_size, lr=0.01, workers=workers, cpus_per_worker=cpus,
                                use_gpu=cfg.gpu, precise_bn_batches=0)
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

    from models.data import ArrayDataset
    from models.loop import image_input

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
    from models.data import ArrayDataset, ArraySplit
    from models.loop import extract_features, feature_input, train_one_epoch

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


# The start-up of a run, in order: each segment ends at its mark (flow stages, ``infra.timeline`` marks on the
# driver, and the worker's own clock from the first epoch's row). The Train worker's process is not on this
# path where it was prestarted (``infra.ray_prestart``): it starts, and imports, beside the segments from
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
                cpus_per_worker: int | None = None) -> B2Run:
    """One `retrain` flow run in this process, with its start-up breakdown."""
    from flows import retrain as retrain_module
    from flows.params import RetrainParams
    from flows.stages import listening
    from infra.epoch_rows import STARTUP_KEYS
    from infra.timeline import recording

    params = RetrainParams(
        limit=int(cfg.train_images / 0.9) + 10, test_limit=200, image_size=cfg.image_size, arch=cfg.arch,
        strategy="replace-fc", epochs=cfg.epochs, batch_size=cfg.batch_size, precise_bn_batches=0,
        workers=workers or cfg.workers, cpus_per_worker=cpus_per_worker or cfg.cpus_per_worker, use_gpu=cfg.gpu,
        model_name=model_name,
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
    return B2Run(steady_img_s(history), first["first_step_at"] - started,
                 marks["promote"] - history[-1]["last_step_at"], startup, end, window,
                 (started, first["first_step_at"]))


# ------------------------------------------------------------------------------------------- service CPU


SERVICE_GROUPS = (  # process -> group, by the first matching word of its command line
    ("ray::RayTrainWorker", "Ray Train worker (training)"), ("ray::TrainController", "Ray Train controller"),
    ("ray::PlacementGroupCleaner", "Ray Train placement-group cleaner"),
    ("ray::SynchronizationActor", "Ray Train synchronization actor"), ("ray::", "Ray Train helper actors"),
    ("gcs_server", "Ray GCS"), ("raylet", "Ray raylet"),
    ("dashboard/agent.py", "Ray dashboard agent"), ("runtime_env/agent", "Ray runtime-env agent"),
    ("dashboard", "Ray dashboard"), ("log_monitor", "Ray log monitor"), ("weed", "SeaweedFS S3"),
    ("mlflow", "MLflow server"), ("prefect worker", "Prefect worker"), ("prefect", "Prefect server"),
)


# a Ray worker process is "python default_worker.py --raylet-name=..." until it names itself "ray::IDLE",
# and "ray::IDLE" until it takes its actor: the groups a process's command line is read again for
PROVISIONAL_GROUPS = frozenset({"Ray raylet", "Ray Train helper actors", "other"})


def service_group(command: str) -> str:
    return next((group for word, group in SERVICE_GROUPS if word in command), "other")


class ServiceCpu(Sampler):
    """CPU time of every process of the stack and of this process tree, sampled every SAMPLE_S (every
    STARTUP_SAMPLE_S for a while after ``fast``), so that what each service took during a window can be read
    afterwards: in cores over B2's steady epochs, in CPU-seconds over its start-up, where Ray Train's
    processes of the run start and the 2 cores are the limit."""

    def __init__(self, stack_home: Path) -> None:
        super().__init__()
        self.stack_home = stack_home
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._fast_until = 0.0
        self._groups: dict[tuple[int, int], str] = {}  # (pid, start tick) -> group

    def fast(self, seconds: float) -> None:
        """Sample every STARTUP_SAMPLE_S for the next ``seconds`` (a run's start-up)."""
        self._fast_until = time.time() + seconds

    def interval(self) -> float:
        return STARTUP_SAMPLE_S if time.time() < self._fast_until else SAMPLE_S

    def _stack_groups(self) -> set[int]:
        groups = set()
        for pid_file in (self.stack_home / "pids").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                groups.add(int(pid_file.read_text().strip()))  # each service leads its process group
        return groups

    def sample(self) -> None:
        """One pass over ``/proc/<pid>/stat`` (parent, process group, CPU ticks): this process, its descendants
        and the stack's process groups. Cheap enough to run every STARTUP_SAMPLE_S beside a start-up it
        measures (3 ms a sample, ~0.5 % of a core, on this host); a process's group comes from its command
        line, read once, and again while its group may still change (PROVISIONAL_GROUPS)."""
        now, me, stack = time.time(), os.getpid(), self._stack_groups()
        table: dict[int, tuple[int, int, float, int]] = {}  # pid -> (parent, process group, CPU-s, start tick)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat_fields(stat.read_text())
                table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]),
                                                (int(fields[11]) + int(fields[12])) / TICKS, int(fields[19]))
        ours, found = {me}, {me}
        while found:  # this process's descendants, generation by generation, and the services' groups
            found = {pid for pid, row in table.items() if pid not in ours and (row[0] in ours or row[1] in stack)}
            ours |= found
        sample = {}
        for pid in ours & table.keys():
            key = (pid, table[pid][3])
            group = self._groups.get(key)
            if group is None or group in PROVISIONAL_GROUPS:
                group = "driver (the flow, this process)" if pid == me else service_group(cmdline(pid))
                self._groups[key] = group
            sample[pid] = (group, table[pid][2])
        self.samples.append((now, sample))

    def cores(self, window: tuple[float, float]) -> dict[str, float]:
        """Cores each group used on average within ``window`` (processes that lived through it)."""
        inside = [s for s in self.samples if window[0] <= s[0] <= window[1]]
        if len(inside) < 2:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        used: dict[str, float] = {}
        for pid, (group, cpu) in last.items():
            if pid in first:
                used[group] = used.get(group, 0.0) + (cpu - first[pid][1]) / (t1 - t0)
        return used

    def cpu_seconds(self, window: tuple[float, float]) -> dict[str, float]:
        """CPU-seconds each group used within ``window``, processes that started or ended in it included: each
        process's CPU time read at both ends, interpolated between the samples around each (a process first
        seen inside the window started there, with none; one gone before its end ended with its last sample).
        A process is grouped by its latest command line (a prestarted Ray worker is ``ray::IDLE`` until it
        takes its actor)."""
        history: dict[int, list[tuple[float, float]]] = {}
        groups: dict[int, str] = {}
        for at, sample in self.samples:
            for pid, (group, cpu) in sample.items():
                history.setdefault(pid, []).append((at, cpu))
                groups[pid] = group

        def cpu_at(points: list[tuple[float, float]], t: float) -> float:
            if t <= points[0][0]:
                return 0.0 if points[0][0] > window[0] else points[0][1]
            for (a, ca), (b, cb) in itertools.pairwise(points):
                if a <= t <= b:
                    return ca + (cb - ca) * (t - a) / (b - a)
            return points[-1][1]

        used: dict[str, float] = {}
        for pid, points in history.items():
            if points[-1][0] < window[0] or points[0][0] > window[1]:
                continue
            seconds = cpu_at(points, window[1]) - cpu_at(points, window[0])
            used[groups[pid]] = used.get(groups[pid], 0.0) + seconds
        return used


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
    from infra.interrupts import shielded, sigterm_as_interrupt
    from infra.settings import load_settings
    from infra.stack import LocalStack, free_ports

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
                        figures.b1_img_s.append(b1_plain(cfg, data.train, data.val))
                    log(f"[{i}] B1 plain PyTorch {figures.b1_img_s[-1]:.1f} img/s")
                # start-up CPU by process: sampled densely until a warm run has surely stepped (10-13 s on a
                # slow host), not into its steady epochs, whose cores are measured at the usual pace
                cpu.fast(20)
                b2 = b2_pipeline(cfg, settings, model_name="bench")
                if i == 0:
                    figures.cold_start_to_first_step_s = b2.to_first_step_s
                else:
                    figures.b2_img_s.append(b2.img_s)
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


def table(figures: Figures) -> str:
    s, m, c = figures.summary(), figures.machine, figures.config

    def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    rows = [
        ("B1 plain PyTorch training", fmt(s["b1_plain_pytorch_img_s"], " img/s"), "baseline"),
        ("B2 headbench retrain (Ray Train + MLflow + S3)", fmt(s["b2_headbench_img_s"], " img/s"),
         f"{c['workers']} Ray Train worker(s), {c['cpus_per_worker'] or 'all'} CPU each"),
        ("B2 / B1", fmt(s["b2_over_b1"], "", 3), "goal >= 0.95"),
        (f"B2 with {c['ddp_workers']} DDP workers x 1 CPU", fmt(s["b2_ddp_img_s"], " img/s"),
         f"{fmt(s['b2_ddp_over_b1'], '', 3)} of B1 (gradient all-reduce on the same cores)"),
        (f"B1-DDP: torch DDP, {c['ddp_workers']} processes x 1 thread, gloo", fmt(s["b1_ddp_img_s"], " img/s"),
         "the same loop, batch and data"),
        ("Ray Train DDP / torch DDP", fmt(s["ray_ddp_over_torch_ddp"], "", 3), "goal >= 0.95"),
        *([("Ray Train alone DDP / torch DDP", fmt(s["ray_alone_ddp_over_torch_ddp"], "", 3),
            f"{fmt(s['ray_alone_ddp_img_s'], ' img/s')}: the worker function, no servers")]
          if "ray_alone_ddp_over_torch_ddp" in s else []),
        ("flow start -> first optimizer step", fmt(s["flow_start_to_first_step_s"], " s"),
         f"goal <= 6 s (cold, starting Ray: {fmt(s['cold_flow_start_to_first_step_s'], ' s')})"),
        ("last step -> model published", fmt(s["last_step_to_published_s"], " s"), "goal <= 10 s"),
        (f"linear probe x{c['probe_epochs']} epochs, cached / uncached",
         f"{fmt(s['probe_cached_s'], ' s')} / {fmt(s['probe_uncached_s'], ' s')}",
         f"speed-up {fmt(s['probe_speedup'], 'x')} (goal >= 5x)"),
        ("data loader alone", fmt(s["loader_img_s"], " img/s", 0),
         f"{fmt(s['loader_over_training'], 'x')} training (goal >= 5x)"),
        ("peak memory per Ray worker", f"{fmt(s['worker_peak_uss_mb'], ' MB', 0)} USS",
         f"goal USS <= 1000 MB; {fmt(s['worker_peak_rss_mb'], ' MB', 0)} RSS (shared libraries included)"),
        ("peak memory of the driver", fmt(s["driver_peak_rss_mb"], " MB", 0), "RSS"),
    ]
    if "ray_alone_img_s" in s:
        rows.insert(1, ("Ray Train alone (private Ray, no servers)", fmt(s["ray_alone_img_s"], " img/s"),
                        f"{fmt(s['ray_alone_over_b1'], '', 3)} of B1: the worker function, checkpoints on local disk"))
    if "b1_compiled_img_s" in s:
        rows.insert(1, ("B1 with torch.compile", fmt(s["b1_compiled_img_s"], " img/s"), "option"))
    for name, label in MFU_LABELS.items():
        if f"{name}_mfu" in s:
            rows.append((f"{label} share of the bf16 FLOP limit", fmt(100 * s[f"{name}_mfu"], " %"),
                         f"{RESNET18_TRAIN_GFLOP_224} GFLOP/img at 224 px"))
    rows += [(f"  start-up: {label}", fmt(seconds, " s", 2), "") for label, seconds in
             s["startup_breakdown_s"].items()]
    rows += [(f"  run end: {label}", fmt(seconds, " s", 2), "") for label, seconds in
             s["end_breakdown_s"].items()]
    rows += [(f"  start-up CPU: {group}", fmt(seconds, " CPU-s", 2), "") for group, seconds in
             s["startup_cpu_s"].items() if seconds >= 0.005]
    rows += [(f"  B2 steady epochs: {group}", fmt(cores, " cores", 2), "") for group, cores in
             s["service_cores"].items()]
    width = max(len(r[0]) for r in rows)
    head = (f"headbench bench: {c['arch']} {c['image_size']} px, batch {c['batch_size']}, {c['train_images']} "
            f"images/epoch, median of {c['repeats']}; {m.get('cores')} cores ({m.get('cpu')}), torch "
            f"{m.get('torch')} with {m.get('torch_threads')} threads" + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    lines = [head, "-" * len(head)] + [f"{a:<{width}}  {b:>22}  {note}" for a, b, note in rows]
    return "\n".join(lines)


def main(*, tiny: bool = False, gpu: bool = False, compile: bool = False, b1_only: bool = False,
         b2_only: bool = False, ray_alone: bool = False, env: tuple[tuple[str, str], ...] = (),
         repeats: int | None = None, workers: int | None = None, image_size: int | None = None,
         home: Path | None = None, json_path: Path = Path("bench/results.json")) -> int:
    """`headbench bench`: run, print the table, write the figures as JSON."""
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
    """`headbench bench ddp-options`: torch DDP 2 x 1 under each DDP option set, interleaved."""
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
