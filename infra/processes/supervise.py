"""Local processes and their ports, on psutil: starting-point facts (free ports, this venv's programs), liveness
by pid and command line, process groups and trees, listening sockets, and stopping exactly one process group.

Every service headbench starts leads its own process group (``start_new_session=True``), so stopping it by
pid stops exactly that tree and nothing else on the machine (never ``pkill -f``, never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path

import psutil

from infra.errors import HeadbenchError

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # console scripts of this venv: weed, mlflow, prefect, ray
WORKER_PORTS = 64  # Ray worker processes per node listen in a range of this width


# Picked ports sit below Linux's ephemeral range (32768-60999): there, between the pick and the server's
# bind, any outgoing connection or any server that binds port 0 may take the port first.
PICK_RANGE = (20000, 32767)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on right now (127.0.0.1), outside the ephemeral range where it can."""
    import random

    low, high = PICK_RANGE
    for _ in range(200):
        port = random.randint(low, high)
        if _bindable(port):
            return port
    with socket.socket() as s:  # a crowded range: any free port
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_port_range(width: int = WORKER_PORTS, taken: set[int] | None = None) -> int:
    """Start of ``width`` consecutive free ports (for Ray's worker port range), clear of ``taken``."""
    taken = taken or set()
    for _ in range(50):
        start = free_port()
        if start + width >= 65000 or taken & set(range(start, start + width)):
            continue
        if all(_bindable(port) for port in range(start, start + width)):
            return start
    raise HeadbenchError("no range of free ports found for Ray workers")


def port_taken(port: int) -> bool:
    """True when another program listens on ``port`` of 127.0.0.1 (TIME_WAIT is no owner, as for servers)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int, marker: str) -> bool:
    """``pid`` is alive and still ours: ``marker`` is a word of its command line (pids get recycled)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def cmdline(pid: int) -> str:
    """The command line of ``pid``, words joined by spaces ("" when it is gone or not ours to read)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid`` (children, their children, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (a zombie holds nothing: it only awaits reaping)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


LOOPBACK_IPS = ("127.0.0.1", "::ffff:127.0.0.1")  # IPv4, and IPv4 as an IPv6 socket sees it


def listening(pids: set[int] | list[int]) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state held by one of ``pids``."""
    wanted = set(pids)
    return [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in wanted]


def memory_kb(pid: int) -> tuple[int, int]:
    """(peak RSS, USS) of ``pid`` in KiB: the kernel's high-water mark (VmHWM) and the pages no other process
    shares (Private_Clean + Private_Dirty). (0, 0) when it is gone."""
    try:
        proc = psutil.Process(pid)
        uss = proc.memory_full_info().uss
        return _status_kb(pid, "VmHWM") or proc.memory_info().rss // 1024, uss // 1024
    except psutil.Error:
        return 0, 0


def _status_kb(pid: int, key: str) -> int:
    # psutil exposes RSS but not its peak; the kernel keeps it in /proc/<pid>/status
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def stat_fields(text: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line after the process name (field 3, the state, first): the name,
    in parentheses, may hold spaces and parentheses, so split after its last ``)``."""
    return text.rsplit(")", 1)[1].split()


def process_started_at(pid: int | None = None) -> float:
    """Wall-clock time a process started, to the kernel's 10 ms tick. psutil's ``create_time`` adds the start
    tick to the boot time of ``/proc/stat``, which Linux rounds to whole seconds: up to a second off, too coarse
    for a start-up breakdown. The start tick against the clock since boot, read now, is not."""
    start_ticks = int(stat_fields(Path(f"/proc/{pid or 'self'}/stat").read_text())[19])  # field 22 (starttime)
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))


def cpu_model() -> str:
    """The CPU's model name (for benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def child_groups(pid: int) -> list[int]:
    """The process groups that descendants of ``pid`` lead in groups of their own (not ``pid``'s)."""
    groups = []
    for proc in descendants(pid):
        try:
            if os.getpgid(proc.pid) == proc.pid:
                groups.append(proc.pid)
        except OSError:
            continue
    return groups


def stop_group(pid: int, timeout: float = 20.0, leader_first: bool = False,
               child_groups_first: bool = False, leader_signal: int = signal.SIGTERM) -> None:
    """SIGTERM the process group led by ``pid`` (started with start_new_session), SIGKILL after timeout.

    ``leader_first``: SIGTERM only the leader and give it the timeout to shut its children down in order
    (a Ray node drains through its GCS, which a group-wide signal would kill first), then the group;
    ``leader_signal`` is what the leader gets (PostgreSQL's fast shutdown is SIGINT: its SIGTERM waits for
    every client to leave).
    ``child_groups_first``: first stop, each as a group with the same timeout, the children that lead groups
    of their own: Prefect's process worker starts every flow run in a new session, and SIGKILLs them when it
    is itself interrupted, so a flow run gets its SIGTERM (and its clean-up) only from us."""
    if child_groups_first:
        children = child_groups(pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(group_members(child) for child in children):
            time.sleep(0.2)
        for child in children:
            if group_members(child):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    if leader_first:
        try:
            os.kill(pid, leader_signal)
        except ProcessLookupError:
            pass
        while time.monotonic() < deadline and alive(pid):
            _reap(pid)
            time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = max(deadline, time.monotonic() + 5)
    while time.monotonic() < deadline:
        _reap(pid)
        if not group_members(pid):  # zombies left behind are no one's to wait for
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect a child we started in this process (tests), so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
