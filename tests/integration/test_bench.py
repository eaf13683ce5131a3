"""The benchmark runs end to end on a tiny setting and emits every figure (no timing assertions: the
figures themselves are reported by `make bench`, not tested)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.run import END_SEGMENTS
from infra.processes.supervise import cmdline, free_port
from tests.conftest import env_without_stack
from tests.integration.conftest import Stack

FIGURES = ("b1_plain_pytorch_img_s", "b2_headbench_img_s", "b2_over_b1", "flow_start_to_first_step_s",
           "cold_flow_start_to_first_step_s", "last_step_to_published_s", "probe_cached_s", "probe_uncached_s",
           "probe_speedup", "loader_img_s", "loader_over_training", "worker_peak_rss_mb", "worker_peak_uss_mb",
           "driver_peak_rss_mb", "ray_alone_img_s", "ray_alone_over_b1", "b1_epoch_wall_s", "b2_epoch_wall_s",
           "b1_over_b2_epoch_wall")


@pytest.mark.training
def test_tiny_bench_emits_every_figure(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray: its workers are ours
    # run where another stack once ran and left its env file (a Ray that is gone): `--home` decides, also for
    # the flows the bench runs, which load their settings themselves
    stale = tmp_path / "old-checkout"
    (stale / ".headbench").mkdir(parents=True)
    (stale / ".headbench" / "env").write_text(f"export RAY_ADDRESS=127.0.0.1:{free_port()}\n")
    done = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--ray-alone", "--home", str(stack.home),
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False, env=env, cwd=stale)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    missing = [name for name in FIGURES if not isinstance(summary.get(name), int | float) or summary[name] <= 0]
    assert not missing, f"figures missing or not positive: {missing}\n{done.stdout[-2000:]}"
    for label in ("B1 plain PyTorch", "B2 headbench", "B2 / B1", "first optimizer step", "model published",
                  "linear probe", "data loader alone", "per Ray worker", "of the driver", "Ray Train alone",
                  "per-epoch wall, B1 / B2"):
        assert label in done.stdout
    # --tiny is one repeat: one B1, one B2, one Ray-alone run, paired; the table shows the summary's figure
    raw = json.loads(out.read_text())["raw"]
    assert [len(raw[k]) for k in ("b1_img_s", "b2_img_s", "ray_alone_img_s")] == [1, 1, 1], raw
    b1, b2 = raw["b1_img_s"][0], raw["b2_img_s"][0]
    assert (summary["b1_plain_pytorch_img_s"], summary["b2_headbench_img_s"]) == (b1, b2)
    assert summary["b2_over_b1"] == pytest.approx(b2 / b1, rel=1e-12)
    [row] = [line for line in done.stdout.splitlines() if "B2 / B1" in line]
    assert f"{b2 / b1:.3f}" in row, row
    # the run's end, segment by segment, adds up to last step -> published (one warm run: no medians to mix)
    end = summary["end_breakdown_s"]
    assert list(end) == [label for label, _ in END_SEGMENTS] and min(end.values()) >= 0, end
    assert sum(end.values()) == pytest.approx(summary["last_step_to_published_s"], abs=1e-6)
    # the start-up's CPU by process: the run's own Train processes, each new in it, did work
    cpu = summary["startup_cpu_s"]
    assert cpu.get("Ray Train worker (training)", 0) > 1 and cpu.get("Ray Train controller", 0) > 0.5, cpu


@pytest.mark.training
def test_tiny_quality_benchmark_writes_its_report(stack: Stack, tmp_path: Path) -> None:
    """`bench quality --tiny`: the plain script and the retrain flow agree exactly on one worker (same loop,
    seed, split and order), and the report holds every part."""
    out, doc = tmp_path / "quality.json", tmp_path / "quality.md"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "bench", "quality", "--tiny", "--home", str(stack.home),
                           "--json", str(out), "--doc", str(doc)],
                          capture_output=True, text=True, timeout=900, check=False, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["plain_accuracy"] == figures["pipeline_accuracy"]
    assert {c["strategy"] for c in figures["demo_checks"]} == {"replace-fc+lp-ft"}
    assert {(r["strategy"], r["probe BN statistics"]) for r in figures["source_bn_ablation"]} == {
        (s, m) for s in ("replace-fc+lp-ft", "mlp+lp-ft") for m in ("target", "source")}
    for side in ("plain_history", "pipeline_history"):  # the same per-epoch columns on both sides
        assert [int(r["epoch"]) for r in figures[side]] == [1, 2]
        assert all(r["first_step_at"] > 0 and r["eval_seconds"] > 0 for r in figures[side]), figures[side]
    assert figures["best_history"] == [] and figures["best_accuracy"] is None  # (b) is not part of --tiny
    cores = figures["pipeline_step_cores"]  # what ran beside the training worker during its steps, by process
    assert cores["Ray Train worker (training)"] == max(cores.values()) > 0.3, cores
    assert list(cores.values()) == sorted(cores.values(), reverse=True)
    text = doc.read_text()
    walls = [float(w) for w in re.findall(r"per-epoch wall, plain / pipeline: (\d\.\d{3})", text)]
    assert len(walls) == 1 and walls[0] > 0, text[:2000]
    for part in ("(a) recipe", "plain script", "steps img/s, pipeline / plain", "(b) best recipe at n/a epochs",
                 "(c) demo comparison", "paired 95% CI", "checkpoint, report and rest s",
                 f"| Ray Train worker (training) | {cores['Ray Train worker (training)']:.2f} |"):
        assert part in text, part


@pytest.mark.training
def test_a_killed_bench_stops_the_stack_it_started_even_when_interrupted_again(tmp_path: Path) -> None:
    """SIGTERM, then Ctrl-C twice during the clean-up: every server of the bench's own stack is stopped and its
    folder removed (SIGTERM used to end the bench on the spot, and a second Ctrl-C cut the teardown short)."""
    env = {k: v for k, v in env_without_stack().items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--tiny", "--b2-only", "--json", str(tmp_path / "b.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert bench.stdout is not None
        seen = []
        for line in bench.stdout:  # "data: ..." once the stack is up
            seen.append(line)
            if line.startswith("data:"):
                break
        else:
            pytest.fail("".join(seen[-40:]))
        servers = psutil.Process(bench.pid).children(recursive=True)
        folders = {arg.split("=", 1)[1].rsplit("/s3", 1)[0] for p in servers for arg in cmdline(p.pid).split()
                   if arg.startswith("-dir=")}
        assert servers and len(folders) == 1, [cmdline(p.pid) for p in servers]
        bench.send_signal(signal.SIGTERM)
        for delay in (0.5, 1.0):
            time.sleep(delay)
            bench.send_signal(signal.SIGINT)
        bench.wait(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
    left = [p.pid for p in servers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [cmdline(pid) for pid in left]
    assert not Path(folders.pop()).exists()
