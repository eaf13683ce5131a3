"""The cache's size cap: least recently used entries go first, entries in use stay, built-ins are never
entries, and `headbench gc` reports and removes (or with --dry-run only lists) what goes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from infra.data.cache import cache_entries, collect, plan_collection, touch

HEADBENCH = str(Path(sys.executable).parent / "headbench")


def _entry(cache: Path, kind: str, name: str, size: int, age_s: float) -> Path:
    folder = cache / kind / name
    folder.mkdir(parents=True)
    (folder / "blob").write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(folder, (when, when))
    return folder


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    _entry(cache, "imagefolder", "old", 4000, 7200)
    _entry(cache, "weights", "models__m__run", 3000, 3600)
    _entry(cache, "imagefolder", "recent", 2000, 60)  # used a minute ago: maybe in use
    (cache / "fashion-mnist").mkdir(parents=True)
    (cache / "fashion-mnist" / "train.gz").write_bytes(b"x" * 50_000)  # a built-in: never an entry
    return cache


def test_entries_are_the_mirrors_and_weight_copies_least_recently_used_first(tmp_path: Path) -> None:
    entries = cache_entries(_cache(tmp_path))
    assert [e.path.name for e in entries] == ["old", "models__m__run", "recent"]
    assert [e.size for e in entries] == [4000, 3000, 2000]


def test_collection_removes_the_least_recently_used_until_under_the_cap(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    removed, left = collect(cache, 6000)
    assert [e.path.name for e in removed] == ["old"] and left == 5000
    assert not (cache / "imagefolder" / "old").exists() and (cache / "weights" / "models__m__run").is_dir()
    assert not list((cache / "imagefolder").glob(".removing-*"))
    assert (cache / "fashion-mnist" / "train.gz").is_file()


def test_an_entry_in_use_is_spared_even_over_the_cap(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    removed, left = collect(cache, 0)
    assert [e.path.name for e in removed] == ["old", "models__m__run"] and left == 2000
    assert (cache / "imagefolder" / "recent").is_dir()
    assert [e.path.name for e in plan_collection(cache_entries(cache), 0, grace_s=0)] == ["recent"]
    assert plan_collection(cache_entries(cache), 0, grace_s=0, keep=[cache / "imagefolder" / "recent"]) == []


def test_a_use_makes_an_entry_the_newest(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    touch(cache / "imagefolder" / "old")
    assert [e.path.name for e in cache_entries(cache)][-1] == "old"
    removed, _ = collect(cache, 6000, grace_s=0)
    assert [e.path.name for e in removed] == ["models__m__run"]  # 9000 - 3000 fits 6000


def test_headbench_gc_lists_with_dry_run_then_removes(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADBENCH_", "MLFLOW_", "AWS_", "PREFECT_API"))}
    env |= {"HEADBENCH_HOME": str(tmp_path), "COLUMNS": "300"}
    dry = subprocess.run([HEADBENCH, "gc", "--limit-gb", "0.000006", "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {cache / 'imagefolder' / 'old'} (4.0 KB)" in dry.stdout
    assert (cache / "imagefolder" / "old").is_dir()
    done = subprocess.run([HEADBENCH, "gc", "--limit-gb", "0"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"removed {cache / 'weights' / 'models__m__run'} (3.0 KB)" in done.stdout
    assert "9.0 KB -> 2.0 KB" in done.stdout and "used in the last 600 s" in done.stdout
    assert [e.path.name for e in cache_entries(cache)] == ["recent"]
    bad = subprocess.run([HEADBENCH, "gc", "--limit-gb", "-1"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --limit-gb: Input should be greater than or equal to 0 (got -1)"
