#!/bin/sh
# Run a command on a Ray node of its own: join the cluster at $RAY_ADDRESS as a node with no CPUs and no
# GPUs, then exec the command. A Ray driver given host:port needs a raylet on its own host; with this, the
# Prefect worker's flow runs (and Train's controller, which Ray puts on the driver's node) live in this
# container, and every training worker lands on the cluster's CPU or GPU nodes.
#   infra/docker/as-ray-node.sh prefect worker start --pool headbench --type process
set -eu
: "${RAY_ADDRESS:?as-ray-node.sh: set RAY_ADDRESS to the Ray head (host:6379)}"
ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats
exec "$@"
