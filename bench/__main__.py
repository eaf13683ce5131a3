import os

from bench.cli import app

os.umask(0o077)  # as `headbench`: what the benchmarks cache under $HEADBENCH_HOME stays private to the user
app(prog_name="python -m bench")
