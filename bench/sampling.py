"""Samplers: threads of the benchmark's process that read /proc every few seconds while a run trains, for the
peak memory of each Ray Train worker (``WorkerMemory``) and the CPU each service and Ray process used
(``ServiceCpu``)."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from infra.processes.supervise import cmdline, descendants, memory_kb, stat_fields

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


# ------------------------------------------------------------------------------------------- service CPU


TRAINING_WORKER = "Ray Train worker (training)"  # the group of the processes that train
SERVICE_GROUPS = (  # process -> group, by the first matching word of its command line
    ("ray::RayTrainWorker", TRAINING_WORKER), ("ray::TrainController", "Ray Train controller"),
    ("ray::PlacementGroupCleaner", "Ray Train placement-group cleaner"),
    ("ray::SynchronizationActor", "Ray Train synchronization actor"),
    # Ray's per-node agents name themselves "ray::<Agent>" once started (setproctitle): before the catch-all
    ("ray::DashboardAgent", "Ray dashboard agent"), ("ray::RuntimeEnvAgent", "Ray runtime-env agent"),
    ("ray::", "Ray Train helper actors"),
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


