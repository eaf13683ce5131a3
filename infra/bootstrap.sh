#!/usr/bin/env bash
# Idempotent set-up of everything headbench needs on a fresh machine: the .venv with all packages
# (torch/torchvision at the versions pinned in pyproject.toml) and, where apt and root are available,
# the Debian package with the Fashion-MNIST files. A stamp keyed on pyproject.toml makes reruns free.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
stamp="$VENV/.headbench-installed-$(sha256sum pyproject.toml | cut -c1-16)"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "bootstrap: installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "bootstrap: dataset-fashion-mnist not installed; Fashion-MNIST will come from its URL or S3"
fi

# The project's own packages, on every run (compileall skips what is up to date, in about a second): the editable
# install imports them from this checkout, where PYTHONDONTWRITEBYTECODE would have every process (the CLI, each
# Ray worker, each flow run the Prefect worker starts) compile them again, about 2 CPU-s each on these cores.
compile_project() {
  "$VENV/bin/python" -m compileall -q -j 0 models infra tasks flows bench tools >/dev/null
}

if [ -f "$stamp" ]; then compile_project; exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing packages into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Byte-compiled at install, not left to first import: where PYTHONDONTWRITEBYTECODE is set (this machine sets
# it) nothing would ever cache the bytecode, and every process would recompile torch, ray, mlflow and prefect
# from source on each start. compileall on every core instead of pip's one-by-one compile: the same .pyc files
# in about a third of the time; its exit status is ignored, since a few packages ship modules for newer
# Pythons only (torch's py312_intrinsics.py), which pip skips as silently.
"$VENV/bin/python" -m pip install -q --no-compile -e '.[dev]'
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
  >/dev/null 2>&1 || true
compile_project
rm -f "$VENV"/.headbench-installed-*
touch "$stamp"
echo "bootstrap: done"
