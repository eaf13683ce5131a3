"""A run without RAY_ADDRESS starts a private Ray whose every listening socket is on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r'''
import json, os, subprocess
from infra.settings import Settings
from tasks.train import cluster_node_cpus
cpus = sum(cluster_node_cpus(Settings(RAY_ADDRESS=None)))

def descendants(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out

mine = descendants(os.getpid())
lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
addresses = [l.split()[3] for l in lines if any(f"pid={p}," in l for p in mine)]
print(json.dumps({"cpus": cpus, "addresses": addresses}))
'''


def test_private_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cpus"] >= 1
    assert report["addresses"], "expected Ray's own listening sockets"
    outside = [a for a in report["addresses"] if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))]
    assert outside == []
