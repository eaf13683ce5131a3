"""A run without RAY_ADDRESS starts a private Ray whose every listening socket is on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from infra.procs import LOOPBACK_IPS

PROBE = r'''
import json, os
from infra.procs import descendants, listening
from infra.ray_cluster import cluster_node_cpus
from infra.settings import Settings
cpus = sum(cluster_node_cpus(Settings(RAY_ADDRESS=None)))
mine = {os.getpid(), *(p.pid for p in descendants(os.getpid()))}
print(json.dumps({"cpus": cpus, "addresses": listening(mine)}))
'''


def test_private_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cpus"] >= 1
    assert report["addresses"], "expected Ray's own listening sockets"
    outside = [a for a in report["addresses"] if a[0] not in LOOPBACK_IPS]
    assert outside == []
