"""infra/processes/supervise.py on real processes: liveness by pid and command line, process groups, trees, listening
sockets, and stop_group stopping exactly one group (a process that ignores SIGTERM included)."""

from __future__ import annotations

import subprocess
import sys
import time

from infra.processes.supervise import (
    LOOPBACK_IPS,
    alive,
    cmdline,
    descendants,
    free_port,
    group_members,
    listening,
    memory_kb,
    pid_alive,
    port_taken,
    process_started_at,
    stop_group,
)

# a group leader with one child; the child ignores SIGTERM, so only SIGKILL ends it
CHILD = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
         "time.sleep(600)")
TREE = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=sys.stdout)
time.sleep(600)
"""

SERVER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True); time.sleep(600)
"""


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_stop_group_ends_the_leader_and_a_child_that_ignores_sigterm() -> None:
    leader = subprocess.Popen([sys.executable, "-c", TREE, "headbench-procs-test"], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
        children = descendants(leader.pid)
        assert len(children) == 1
        assert set(group_members(leader.pid)) == {leader.pid, children[0].pid}
        assert pid_alive(leader.pid, "headbench-procs-test") and not pid_alive(leader.pid, "no-such-word")
        assert "headbench-procs-test" in cmdline(leader.pid)
        rss, uss = memory_kb(leader.pid)
        assert rss >= uss > 0
        started = time.monotonic()
        stop_group(leader.pid, timeout=2)
        assert time.monotonic() - started < 15
        leader.wait(timeout=5)
        _wait(lambda: not alive(children[0].pid))
        assert group_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            leader.kill()


def test_listening_sockets_of_a_process_and_port_taken() -> None:
    port = free_port()
    assert not port_taken(port)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        assert listening({server.pid}) == [("127.0.0.1", port)]
        assert all(ip in LOOPBACK_IPS for ip, _ in listening({server.pid}))
        assert port_taken(port)
    finally:
        stop_group(server.pid, timeout=5)
        server.wait(timeout=5)
    assert not alive(server.pid) and cmdline(server.pid) == ""


# like Prefect's process worker: a leader that runs its child in a session of its own and SIGKILLs it when it
# is itself terminated; the child cleans up (writes a file) on SIGTERM
CLEANER = ("import signal, sys, time\n"
           "def done(*_):\n    open(sys.argv[1], 'w').write('cleaned'); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, done); print('ready', flush=True); time.sleep(600)")
SUPERVISOR = f"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CLEANER!r}, sys.argv[1]], stdout=sys.stdout,
                         start_new_session=True)
def hard(*_):
    child.kill(); child.wait(); sys.exit(0)
signal.signal(signal.SIGTERM, hard)
time.sleep(600)
"""


def test_stop_group_gives_children_in_their_own_sessions_their_sigterm_first(tmp_path) -> None:
    for first, expected in ((False, False), (True, True)):
        marker = tmp_path / f"cleaned-{first}"
        leader = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(marker)], stdout=subprocess.PIPE,
                                  text=True, start_new_session=True)
        try:
            assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
            [child] = descendants(leader.pid)
            assert group_members(leader.pid) == [leader.pid]  # the child is not in the leader's group
            stop_group(leader.pid, timeout=5, child_groups_first=first)
            leader.wait(timeout=5)
            _wait(lambda pid=child.pid: not alive(pid))
            assert marker.exists() is expected
        finally:
            if leader.poll() is None:
                leader.kill()


def test_process_started_at_is_the_start_to_the_tick_not_to_the_second() -> None:
    """psutil's create_time can be up to a second off (boot time in whole seconds); the start-up breakdown needs
    the start itself: a child started between two clock reads is dated between them."""
    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    after = time.time()
    try:
        tick = 0.011  # the kernel dates a start to its 10 ms tick
        assert before - tick <= process_started_at(child.pid) <= after + tick
        assert process_started_at() < before  # this process started before the test ran
    finally:
        child.kill()
        child.wait()
