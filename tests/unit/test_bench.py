"""The bench's figures and table, without running anything: what a B1-only run (a GPU machine with PyTorch
and none of the stack) prints."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

import bench.sampling
from bench import epoch_walls, steady_epoch_wall
from bench.config import RESNET18_TRAIN_GFLOP_224, BenchConfig, Figures, paired_ratio
from bench.report import table
from bench.sampling import Sampler, ServiceCpu


def test_a_b1_only_run_reports_the_loop_and_its_share_of_the_flop_limit() -> None:
    cfg = replace(BenchConfig.gpu_default(), b1_only=True, compile=True, ray_alone=True)
    figures = Figures(machine={"cores": 16, "gpu": "NVIDIA H200", "peak_bf16_tflops": 989.0}, config=asdict(cfg),
                      b1_img_s=[9000.0, 10000.0, 11000.0], b1_compiled_img_s=[12000.0], loader_img_s=[50000.0],
                      ray_alone_img_s=[8550.0, 9500.0, 10450.0])

    summary = figures.summary()
    assert summary["b2_headbench_img_s"] is None and summary["b2_over_b1"] is None
    assert summary["b1_plain_pytorch_mfu"] == pytest.approx(10000.0 * RESNET18_TRAIN_GFLOP_224 * 1e9 / 989e12)
    assert summary["b1_compiled_mfu"] == pytest.approx(12000.0 * RESNET18_TRAIN_GFLOP_224 * 1e9 / 989e12)
    assert "b2_headbench_mfu" not in summary
    assert summary["loader_over_training"] == pytest.approx(5.0)
    assert summary["ray_alone_over_b1"] == pytest.approx(0.95)

    lines = table(figures).splitlines()
    assert "GPU NVIDIA H200" in lines[0]
    assert any(line.startswith("B1 share of the bf16 FLOP limit") and "5.6 %" in line for line in lines)
    assert any(line.startswith("B1 torch.compile share of the bf16 FLOP limit") and "6.7 %" in line
               for line in lines)
    assert any(line.startswith("B2 / B1") and "n/a" in line for line in lines)
    assert any(line.startswith("Ray Train alone (private Ray") and "9500.0 img/s" in line and "0.950 of B1" in line
               for line in lines)


def test_ray_train_alone_in_ddp_is_judged_against_torch_ddp() -> None:
    figures = Figures(machine={"cores": 2}, config=asdict(replace(BenchConfig(), ray_alone=True)),
                      b1_img_s=[300.0], b2_img_s=[255.0], b2_ddp_img_s=[210.0, 220.0, 230.0],
                      b1_ddp_img_s=[240.0, 250.0, 260.0], ray_alone_img_s=[297.0],
                      ray_alone_ddp_img_s=[235.0, 245.0, 255.0])
    summary = figures.summary()
    assert summary["ray_ddp_over_torch_ddp"] == pytest.approx(220.0 / 250.0)
    assert summary["ray_alone_ddp_over_torch_ddp"] == pytest.approx(245.0 / 250.0)
    [row] = [line for line in table(figures).splitlines() if line.startswith("Ray Train alone DDP / torch DDP")]
    assert "0.980" in row and "245.0 img/s" in row


def test_a_ratio_is_the_median_of_its_pairs_so_host_drift_cancels() -> None:
    """B1 and B2 alternate; the host got faster between the pairs. Each pair's ratio holds; the ratio of the
    two medians (150 / 200) would mix runs from different minutes."""
    figures = Figures(machine={"cores": 2}, config=asdict(BenchConfig()),
                      b1_img_s=[100.0, 200.0, 300.0], b2_img_s=[90.0, 200.0, 150.0])
    assert figures.summary()["b2_over_b1"] == pytest.approx(0.9)
    assert paired_ratio([1.0, 2.0], [0.0, 4.0]) == pytest.approx(0.5)  # a failed (0 img/s) run is no pair
    assert paired_ratio([], [1.0]) is None


def test_samplers_take_no_sample_while_b1_trains_in_their_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.sampling, "SAMPLE_S", 0.01)

    class Counter(Sampler):
        taken = 0

        def sample(self) -> None:
            Counter.taken += 1

    with Sampler.quiet():  # entered first: no race with the sampler's first tick
        with Counter().sampling():
            time.sleep(0.3)  # ~30 ticks
        assert Counter.taken == 0
    with Counter().sampling():
        time.sleep(0.3)
    assert Counter.taken > 0


# a child that starts, burns ~0.6 s of CPU (its interpreter's start included), idles and exits, all within a
# window (the idle end lets a sample see all of it: what a process does after its last sample is not counted)
BURN = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(0.6)"


def test_start_up_cpu_counts_processes_that_start_and_exit_inside_the_window(tmp_path: Path) -> None:
    cpu = ServiceCpu(tmp_path)  # no stack: this process and its children
    cpu.fast(30)
    assert cpu.interval() == bench.sampling.STARTUP_SAMPLE_S
    with cpu.sampling():
        time.sleep(0.6)
        start = time.time()
        subprocess.run([sys.executable, "-c", BURN], check=True)
        time.sleep(0.6)  # the child is gone: its last sample is what it used
        end = time.time()
        time.sleep(0.6)
    used = cpu.cpu_seconds((start, end))
    assert 0.45 <= used.get("other", 0.0) <= 1.5, used  # the child, found by its command line: no service
    assert used.get("driver (the flow, this process)", 0.0) < 0.3, used  # idle, but for the sampler itself
    assert cpu.cpu_seconds((end + 10, end + 20)) == {}  # nothing sampled there
    cpu.fast(0)
    assert cpu.interval() == bench.sampling.SAMPLE_S


def test_per_epoch_wall_and_sync_checkpoints_are_paired_against_b1() -> None:
    """Each epoch's wall time (first step to the next epoch's first step) from the rows' step marks; B1 over B2
    paired as img/s is; B2 with synchronous checkpoints beside it, in its own row."""
    history = [{"epoch": e, "images_per_second": 100.0, "first_step_at": at} for e, at in
               ((1, 10.0), (2, 22.0), (3, 33.0), (4, 44.5))]
    assert epoch_walls(history) == [12.0, 11.0, 11.5] and steady_epoch_wall(history) == 11.25
    assert epoch_walls(history[:1]) == [] and steady_epoch_wall(history[:1]) is None
    figures = Figures(machine={"cores": 2}, config=asdict(BenchConfig()), b1_img_s=[100.0], b2_img_s=[95.0],
                      b1_epoch_wall_s=[10.0, 20.0], b2_epoch_wall_s=[10.5, 20.0],
                      b2_sync_img_s=[94.0], b2_sync_epoch_wall_s=[12.5, 25.0])
    summary = figures.summary()
    assert summary["b1_over_b2_epoch_wall"] == pytest.approx(statistics.median([10 / 10.5, 1.0]))
    assert summary["b1_over_b2_sync_epoch_wall"] == pytest.approx(0.8)
    lines = table(figures).splitlines()
    assert any(line.startswith("per-epoch wall, B1 / B2") and f"{summary['b1_over_b2_epoch_wall']:.3f}" in line
               for line in lines)
    assert any(line.startswith("B2 with synchronous checkpoints") and "0.800" in line for line in lines)


def test_quality_ratios_of_two_epochs_are_the_mean_of_both_not_the_better() -> None:
    """`make quality`'s (a) has two epochs: the steps ratio is the median of both epochs' ratios, the mean of
    the two, never the higher one; the per-epoch wall has one epoch with a next one."""
    from bench.quality import QualityFigures

    def rows(rates: list[float], starts: list[float]) -> list[dict[str, float]]:
        return [{"images_per_second": r, "first_step_at": s} for r, s in zip(rates, starts, strict=True)]

    f = QualityFigures(plain_history=rows([600.0, 600.0], [1000.0, 1100.0]), plain_seconds=200.0,
                       pipeline_history=rows([570.0, 480.0], [5000.0, 5125.0]), pipeline_seconds=250.0)
    assert f.ratios() == {"steps img/s": pytest.approx((0.95 + 0.8) / 2), "per-epoch wall": pytest.approx(0.8),
                          "end to end": pytest.approx(0.8)}


@pytest.mark.parametrize(("title", "group"), [
    ("ray::DashboardAgent", "Ray dashboard agent"), ("ray::RuntimeEnvAgent", "Ray runtime-env agent"),
    ("ray::RayTrainWorker.run_train_fn", bench.sampling.TRAINING_WORKER),
    ("ray::_AutoscalingCoordinatorActor", "Ray Train helper actors")])
def test_ray_agents_named_by_their_process_title_are_not_counted_as_train_helpers(title: str, group: str) -> None:
    assert bench.sampling.service_group(title) == group
