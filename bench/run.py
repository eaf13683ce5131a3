"""The pipeline benchmark: what Prefect + Ray Train + MLflow + S3 cost over a plain PyTorch loop.

Everything runs in ONE process tree on the same data, model, batch and image size:

- B1  the same training loop (``models.loop.fit``) called in this process: no Ray, Prefect or MLflow, all
      cores, steady-state img/s from epochs 2..;
- B2  the `retrain` flow (Ray Train workers, rank-0 MLflow logging per epoch, S3 checkpoints), steady-state
      img/s from epochs 2.. of each run, and its fixed costs: flow start -> first optimizer step and last
      optimizer step -> model published;
- the linear probe with cached backbone features vs recomputing them every epoch (same epochs);
- the data loader alone (batches as training consumes them, no model);
- peak memory of every Ray Train worker (VmHWM, and USS = pages no other process shares) and of the driver.

Each figure is the median of ``repeats`` runs. Prints a table and writes JSON. Not a test: the tests only
check that a tiny setting emits every figure.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.procs import cmdline, cpu_model, descendants, memory_kb
from infra.settings import STANDARD_VARIABLES

# ResNet-18 training at 224 px: ~1.82 GFLOP forward, x3 for forward + backward (He et al.; fvcore counts).
RESNET18_TRAIN_GFLOP_224 = 5.5
# Dense bf16 tensor-core peak of common accelerators, TFLOP/s, for the ratio to the FLOP limit.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "T4": 65.0}


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
    b2_ddp_img_s: list[float] = field(default_factory=list)  # ddp_workers x 1 CPU
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
            "b1_plain_pytorch_img_s": b1, "b2_headbench_img_s": b2, "b2_over_b1": b2 / b1 if b1 else None,
            "b2_ddp_img_s": med(self.b2_ddp_img_s),
            "b2_ddp_over_b1": med(self.b2_ddp_img_s) / b1 if b1 and self.b2_ddp_img_s else None,
            "flow_start_to_first_step_s": med(self.start_to_first_step_s),
            "cold_flow_start_to_first_step_s": self.cold_start_to_first_step_s,
            "last_step_to_published_s": med(self.last_step_to_published_s),
            "probe_cached_s": med(self.probe_cached_s), "probe_uncached_s": med(self.probe_uncached_s),
            "probe_speedup": (med(self.probe_uncached_s) / med(self.probe_cached_s)) if self.probe_cached_s else None,
            "loader_img_s": med(self.loader_img_s),
            "loader_over_training": med(self.loader_img_s) / b1 if b1 else None,
            "worker_peak_rss_mb": max(self.worker_peak_rss_mb, default=None),
            "worker_peak_uss_mb": max(self.worker_peak_uss_mb, default=None),
            "driver_peak_rss_mb": self.driver_peak_rss_mb,
        }
        if self.b1_compiled_img_s:
            out["b1_compiled_img_s"] = med(self.b1_compiled_img_s)
        if self.config.get("gpu"):
            flop = RESNET18_TRAIN_GFLOP_224 * (self.config["image_size"] / 224) ** 2 * 1e9
            peak = self.machine.get("peak_bf16_tflops")
            for key in ("b1_plain_pytorch_img_s", "b2_headbench_img_s"):
                if out[key] and peak:
                    out[key.replace("_img_s", "_mfu")] = out[key] * flop / (peak * 1e12)
        return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


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


class WorkerMemory:
    """Samples this process tree's Ray Train workers (found by their process title) once a second:
    VmHWM is the kernel's own peak RSS; USS (Private_Clean + Private_Dirty) leaves out pages shared with
    other processes, e.g. the dataset in Ray's object store."""

    def __init__(self) -> None:
        self.peak_rss_kb: dict[int, int] = {}
        self.peak_uss_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for proc in descendants(os.getpid()):
                if "TrainWorker" not in cmdline(proc.pid):
                    continue
                rss, uss = memory_kb(proc.pid)
                self.peak_rss_kb[proc.pid] = max(self.peak_rss_kb.get(proc.pid, 0), rss)
                self.peak_uss_kb[proc.pid] = max(self.peak_uss_kb.get(proc.pid, 0), uss)

    @contextmanager
    def sampling(self) -> Iterator[WorkerMemory]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


# ------------------------------------------------------------------------------------------- data


def bench_data(cfg: BenchConfig, cache_dir: Path) -> Any:
    """Fashion-MNIST, all 10 classes, ``train_images`` for training (+10% val), resized once."""
    from infra.datasets import DataSpec, load_raw, prepare

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
    steady = [row["images_per_second"] for row in result.history[1:]] or [result.history[0]["images_per_second"]]
    return statistics.median(steady)


# ------------------------------------------------------------------------------------------- loader, probe


def loader_rate(cfg: BenchConfig, train: Any) -> float:
    """The input pipeline alone: shuffle, collate, flip, normalise (what each training step consumes). img/s."""
    import torch

    from models.data import ArrayDataset
    from models.loop import image_input

    loader = torch.utils.data.DataLoader(ArrayDataset(train), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True)
    prepare = image_input()
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        prepare(images, True)
        n += images.shape[0]
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


def b2_pipeline(cfg: BenchConfig, settings: Any, model_name: str, workers: int | None = None,
                cpus_per_worker: int | None = None) -> tuple[float, float, float]:
    """One `retrain` flow run in this process: (steady img/s, flow start -> first step, last step -> published)."""
    from flows import retrain as retrain_module
    from flows.params import RetrainParams
    from flows.stages import listening

    params = RetrainParams(
        limit=int(cfg.train_images / 0.9) + 10, test_limit=200, image_size=cfg.image_size, arch=cfg.arch,
        strategy="replace-fc", epochs=cfg.epochs, batch_size=cfg.batch_size, precise_bn_batches=0,
        workers=workers or cfg.workers, cpus_per_worker=cpus_per_worker or cfg.cpus_per_worker, use_gpu=cfg.gpu,
        model_name=model_name,
        promote="never")
    marks: dict[str, float] = {}

    def mark(stage: str) -> None:
        marks.setdefault(stage, time.time())

    with listening(mark):
        started = time.time()
        result = retrain_module.retrain(params)
    history = result.history
    steady = [row["images_per_second"] for row in history[1:]] or [history[0]["images_per_second"]]
    # "promote" is announced right after the publish task returned: the model is in S3 and registered
    return (statistics.median(steady), history[0]["first_step_at"] - started,
            marks["promote"] - history[-1]["last_step_at"])


# ------------------------------------------------------------------------------------------- driver


@contextmanager
def local_stack(home: Path | None) -> Iterator[Any]:
    """The stack at ``home`` when it is up, else a private one on free ports, stopped afterwards.

    The benchmarks train on a private Ray this process starts, also when the stack has a cluster: the Ray
    workers are then this process's descendants (memory sampling) and share the cores with nothing else. An
    empty RAY_ADDRESS outranks the stack's env file, for the flows this process runs too."""
    from infra.settings import load_settings
    from infra.stack import LocalStack, free_ports

    os.environ["RAY_ADDRESS"] = ""
    if home is not None:
        settings = load_settings(home)
        if all(s.healthy for s in LocalStack(settings).status()):
            yield settings
            return
    with tempfile.TemporaryDirectory(prefix="headbench-bench-") as tmp:
        stack = LocalStack(load_settings(Path(tmp)), free_ports())
        try:
            stack.up()
            yield load_settings(Path(tmp))
        finally:
            stack.down()


def run(cfg: BenchConfig, home: Path | None = None, log: Callable[[str], None] = print) -> Figures:
    figures = Figures(machine=machine_facts(cfg), config=asdict(cfg))
    if cfg.b1_only:  # no stack, no Ray
        data = bench_data(cfg, (home or Path(".headbench")) / "cache")
        for i in range(cfg.repeats):
            figures.b1_img_s.append(b1_plain(cfg, data.train, data.val))
            log(f"[{i + 1}/{cfg.repeats}] B1 plain PyTorch {figures.b1_img_s[-1]:.1f} img/s")
        return figures
    with local_stack(home) as settings:
        for key in STANDARD_VARIABLES:
            os.environ.pop(key, None)  # the stack's values, not a leftover shell's
        settings.export_env()  # before prefect is imported
        data = bench_data(cfg, settings.cache_dir)
        log(f"data: {len(data.train)} training images at {cfg.image_size} px; machine {figures.machine}")
        for i in range(cfg.repeats):
            figures.loader_img_s.append(loader_rate(cfg, data.train))
            figures.b1_img_s.append(b1_plain(cfg, data.train, data.val))
            log(f"[{i + 1}/{cfg.repeats}] loader {figures.loader_img_s[-1]:.0f} img/s, "
                f"B1 plain PyTorch {figures.b1_img_s[-1]:.1f} img/s")
        if cfg.compile:
            for i in range(cfg.repeats):
                figures.b1_compiled_img_s.append(b1_plain(cfg, data.train, data.val, compiled=True))
                log(f"[{i + 1}/{cfg.repeats}] B1 torch.compile {figures.b1_compiled_img_s[-1]:.1f} img/s")
        for i in range(cfg.repeats):
            cached, uncached = probe_times(cfg, data.train)
            figures.probe_cached_s.append(cached)
            figures.probe_uncached_s.append(uncached)
            log(f"[{i + 1}/{cfg.repeats}] linear probe x{cfg.probe_epochs} epochs: cached {cached:.1f} s, "
                f"uncached {uncached:.1f} s")
        with WorkerMemory().sampling() as memory:
            for i in range(cfg.repeats + 1):  # the first run also starts Ray: reported apart, as "cold"
                img_s, to_first, to_published = b2_pipeline(cfg, settings, model_name="bench")
                if i == 0:
                    figures.cold_start_to_first_step_s = to_first
                else:
                    figures.b2_img_s.append(img_s)
                    figures.start_to_first_step_s.append(to_first)
                    figures.last_step_to_published_s.append(to_published)
                log(f"[{'cold' if i == 0 else i}] B2 headbench {img_s:.1f} img/s, flow start -> first step "
                    f"{to_first:.1f} s, last step -> published {to_published:.1f} s")
            for i in range(cfg.repeats if cfg.ddp_workers else 0):
                img_s, _, _ = b2_pipeline(cfg, settings, "bench", workers=cfg.ddp_workers, cpus_per_worker=1)
                figures.b2_ddp_img_s.append(img_s)
                log(f"[{i + 1}/{cfg.repeats}] B2 headbench, {cfg.ddp_workers} DDP workers x 1 CPU: {img_s:.1f} img/s")
        figures.worker_peak_rss_mb = [kb / 1024 for kb in memory.peak_rss_kb.values()]
        figures.worker_peak_uss_mb = [kb / 1024 for kb in memory.peak_uss_kb.values()]
        figures.driver_peak_rss_mb = memory_kb(os.getpid())[0] / 1024
    return figures


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
        ("flow start -> first optimizer step", fmt(s["flow_start_to_first_step_s"], " s"),
         f"goal <= 10 s (cold, starting Ray: {fmt(s['cold_flow_start_to_first_step_s'], ' s')})"),
        ("last step -> model published", fmt(s["last_step_to_published_s"], " s"), "goal <= 10 s"),
        (f"linear probe x{c['probe_epochs']} epochs, cached / uncached",
         f"{fmt(s['probe_cached_s'], ' s')} / {fmt(s['probe_uncached_s'], ' s')}",
         f"speed-up {fmt(s['probe_speedup'], 'x')} (goal >= 5x)"),
        ("data loader alone", fmt(s["loader_img_s"], " img/s", 0),
         f"{fmt(s['loader_over_training'], 'x')} training (goal >= 5x)"),
        ("peak memory per Ray worker", f"{fmt(s['worker_peak_rss_mb'], ' MB', 0)} RSS",
         f"{fmt(s['worker_peak_uss_mb'], ' MB', 0)} USS (goal RSS <= 1024 MB)"),
        ("peak memory of the driver", fmt(s["driver_peak_rss_mb"], " MB", 0), "RSS"),
    ]
    if "b1_compiled_img_s" in s:
        rows.insert(1, ("B1 with torch.compile", fmt(s["b1_compiled_img_s"], " img/s"), "option"))
    for key in ("b1_plain_pytorch_mfu", "b2_headbench_mfu"):
        if key in s:
            rows.append((f"{key.split('_')[0].upper()} share of the bf16 FLOP limit", fmt(100 * s[key], " %"),
                         f"{RESNET18_TRAIN_GFLOP_224} GFLOP/img at 224 px"))
    width = max(len(r[0]) for r in rows)
    head = (f"headbench bench: {c['arch']} {c['image_size']} px, batch {c['batch_size']}, {c['train_images']} "
            f"images/epoch, median of {c['repeats']}; {m.get('cores')} cores ({m.get('cpu')}), torch "
            f"{m.get('torch')} with {m.get('torch_threads')} threads" + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    lines = [head, "-" * len(head)] + [f"{a:<{width}}  {b:>22}  {note}" for a, b, note in rows]
    return "\n".join(lines)


def main(*, tiny: bool = False, gpu: bool = False, compile: bool = False, b1_only: bool = False,
         repeats: int | None = None, workers: int | None = None, image_size: int | None = None,
         home: Path | None = None, json_path: Path = Path("bench/results.json")) -> int:
    """`headbench bench`: run, print the table, write the figures as JSON."""
    cfg = BenchConfig.tiny() if tiny else BenchConfig.gpu_default() if gpu else BenchConfig()
    overrides = {"repeats": repeats, "workers": workers, "image_size": image_size, "compile": compile or None,
                 "b1_only": b1_only or None}
    cfg = BenchConfig(**(asdict(cfg) | {k: v for k, v in overrides.items() if v is not None}))
    started = time.perf_counter()
    figures = run(cfg, home or (Path(os.environ["HEADBENCH_HOME"]) if "HEADBENCH_HOME" in os.environ else None))
    print(table(figures), flush=True)
    result = {"summary": figures.summary(), "raw": asdict(figures), "seconds": time.perf_counter() - started}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"figures: {json_path} (bench took {result['seconds']:.0f} s)")
    return 0
