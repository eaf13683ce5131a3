"""Services as this project runs them: each one a process group of its own, started with a private umask
and a log file, known by a pid file under its home, healthy when its probe says so, stopped by pid (never by
name). ``Supervisor`` starts a list of ``ServiceSpec``s side by side as their needs allow and stops them in
reverse order; ``infra.stack.local.LocalStack`` is the stack built on it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.errors import HeadbenchError
from infra.processes.supervise import HOST, pid_alive, port_taken, stop_group


class StackError(HeadbenchError):
    pass


@dataclass(frozen=True)
class ServiceSpec:
    """One service: how to start it, tell it is healthy, and stop it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health: Callable[[], bool]
    url: str  # what a person opens (UI or endpoint)
    marker: str  # a word of the command line, to tell our process from a recycled pid
    leader_first: bool = False  # stop: SIGTERM the leader alone first (a Ray node drains through its GCS)
    child_groups_first: bool = False  # stop: first the children in groups of their own (a worker's flow runs)
    after: tuple[str, ...] = ()  # start once these are healthy (a Ray node needs its head's GCS)
    leader_signal: int = signal.SIGTERM  # with leader_first: what the leader gets
    prepare: Callable[[], None] | None = None  # once healthy, before what comes after it starts (databases)
    ports: dict[str, int] = field(default_factory=dict)  # its ports by setting name: checked free before it starts


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 2xx within ``timeout`` (health endpoints)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Supervisor:
    """Start, check and stop services whose pid files, logs and private files live under ``home``."""

    home: Path

    def _private_dirs(self) -> None:
        """$HEADBENCH_HOME and its service folders, 0700 (an existing folder's mode is reset): the env file,
        the stores and the logs hold the stack's keys and data."""
        for sub in ("", "pids", "logs", "s3", "mlflow", "prefect"):
            path = self.home / sub
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)

    def _write_private(self, path: Path, text: str) -> None:
        self._private_dirs()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies to new files only: reset an existing file's
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def pid_file(self, name: str) -> Path:
        return self.home / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _start(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        self._private_dirs()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "RAY_"))}  # no foreign endpoints
        env.update(spec.env)
        log = os.fdopen(os.open(self.log_file(spec.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        # umask 077: what the servers write under $HEADBENCH_HOME (stores, sockets, flow-run files) is 0600/0700
        proc = subprocess.Popen(spec.argv, cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        log.close()
        self._write_private(self.pid_file(spec.name), f"{proc.pid}\n")
        return proc

    def _start_all(self, specs: list[ServiceSpec], timeout: float,
                   on_ready: Callable[[str, str, bool], None] | None) -> None:
        """Start every service that is not running as soon as the ones it comes ``after`` are healthy, so
        independent servers boot side by side (each is one mostly single-threaded process); report each in
        list order. A service that exits or is not healthy ``timeout`` s after its start fails ``up``; so does a
        busy port or Ctrl-C, and then every service this call started is stopped again (one that was running
        before stays)."""
        started: list[ServiceSpec] = []
        try:
            self._start_each(specs, timeout, on_ready, started)
        except BaseException:
            self._stop(started, timeout=10)
            raise

    def _start_each(self, specs: list[ServiceSpec], timeout: float,
                    on_ready: Callable[[str, str, bool], None] | None, started: list[ServiceSpec]) -> None:
        ready: dict[str, bool] = {}  # name -> it was running already
        waiting: dict[str, tuple[Callable[[], bool], float]] = {}  # started, not yet healthy: (alive, deadline)
        reported = 0
        while reported < len(specs):
            progressed = True
            while progressed:  # until a pass starts nothing: one whose need turned healthy just now starts too
                progressed = False
                for spec in specs:
                    if spec.name in ready or spec.name in waiting or not all(d in ready for d in spec.after):
                        continue
                    pid = self._pid(spec.name)
                    if pid is not None and pid_alive(pid, spec.marker) and spec.health():
                        ready[spec.name] = progressed = True
                        continue
                    if pid is not None and pid_alive(pid, spec.marker):  # started earlier, still coming up
                        alive = functools.partial(pid_alive, pid, spec.marker)
                    else:
                        self._check_ports(spec)
                        alive = functools.partial(lambda p: p.poll() is None, self._start(spec))
                        started.append(spec)
                    waiting[spec.name] = (alive, time.monotonic() + timeout)
                    progressed = True
            if not waiting and not all(d in ready for s in specs if s.name not in ready for d in s.after):
                blocked = [s.name for s in specs if s.name not in ready]
                raise StackError(f"cannot start {', '.join(blocked)}: they wait for services that are not in the "
                                 "stack")
            for spec in specs:
                if spec.name not in waiting:
                    continue
                alive, deadline = waiting[spec.name]
                if spec.health():
                    if spec.prepare:
                        spec.prepare()
                    del waiting[spec.name]
                    ready[spec.name] = False
                elif not alive():
                    tail = self.log_file(spec.name).read_text(errors="replace").strip().splitlines()[-1:]
                    raise StackError(f"{spec.name} exited during start-up; see {self.log_file(spec.name)}: "
                                     f"{tail[0] if tail else ''}")
                elif time.monotonic() > deadline:
                    raise StackError(f"{spec.name} not healthy at {spec.url} after {timeout:.0f} s; "
                                     f"see {self.log_file(spec.name)}")
            while reported < len(specs) and specs[reported].name in ready:
                spec = specs[reported]
                if on_ready:
                    on_ready(spec.name, spec.url, ready[spec.name])
                reported += 1
            if reported < len(specs):
                time.sleep(0.5)

    def _check_ports(self, spec: ServiceSpec) -> None:
        """One line naming the port and its setting when another program already listens on it."""
        for name, port in spec.ports.items():
            if port_taken(port):
                raise StackError(f"{spec.name}: port {port} on {HOST} is in use by another program; choose a "
                                 f"free one with HEADBENCH_PORT_{name.upper()}=PORT")

    def _stop(self, specs: list[ServiceSpec], timeout: float = 20.0) -> list[str]:
        stopped = []
        for spec in reversed(specs):
            pid = self._pid(spec.name)
            if pid is not None and pid_alive(pid, spec.marker):
                stop_group(pid, timeout, leader_first=spec.leader_first,
                           child_groups_first=spec.child_groups_first, leader_signal=spec.leader_signal)
                stopped.append(spec.name)
            self.pid_file(spec.name).unlink(missing_ok=True)
        return stopped
