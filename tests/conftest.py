"""Test-wide environment: no foreign endpoints leak in, and every Ray socket stays on 127.0.0.1."""

from __future__ import annotations

import os

from infra.ray_cluster import LOOPBACK_ENV

# Set before anything imports ray (its constants are read at import time).
for _name in list(os.environ):
    if _name.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS", "HEADBENCH_")):
        del os.environ[_name]
os.environ.update(LOOPBACK_ENV)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
