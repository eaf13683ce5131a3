"""What a benchmark run is asked for (``BenchConfig``), what it measures (``Figures``: every run's raw figures,
summarised as medians and paired ratios) and the machine it ran on."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any

from infra.processes.supervise import cpu_model

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
    sync_checkpoints: bool = True  # also B2 with training waiting for each checkpoint upload, beside each B2
    env: tuple[tuple[str, str], ...] = ()  # set before the stack and Ray start, e.g. RAY_worker_niceness=15

    @classmethod
    def tiny(cls) -> BenchConfig:
        """For the test that checks every figure is emitted (seconds, not minutes)."""
        return cls(image_size=32, batch_size=32, train_images=128, epochs=2, probe_epochs=2,
                   probe_images=64, repeats=1, workers=1, ddp_workers=0, sync_checkpoints=False)

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
    b1_epoch_wall_s: list[float] = field(default_factory=list)  # steady epoch: first step to the next's first step
    b2_epoch_wall_s: list[float] = field(default_factory=list)  # the same, B2 (checkpoints uploaded asynchronously)
    b2_sync_img_s: list[float] = field(default_factory=list)  # B2 with training waiting for each upload
    b2_sync_epoch_wall_s: list[float] = field(default_factory=list)
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
            "b1_epoch_wall_s": med(self.b1_epoch_wall_s), "b2_epoch_wall_s": med(self.b2_epoch_wall_s),
            "b1_over_b2_epoch_wall": paired_ratio(self.b1_epoch_wall_s, self.b2_epoch_wall_s),
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
        if self.b2_sync_img_s:
            out["b2_sync_img_s"] = med(self.b2_sync_img_s)
            out["b2_sync_epoch_wall_s"] = med(self.b2_sync_epoch_wall_s)
            out["b1_over_b2_sync_epoch_wall"] = paired_ratio(self.b1_epoch_wall_s, self.b2_sync_epoch_wall_s)
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


