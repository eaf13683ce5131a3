"""The local caches under ``$HEADBENCH_HOME/cache``, kept within a size cap (``HEADBENCH_CACHE_LIMIT_GB``).

Three kinds of entry, each a folder that can always be fetched again: ``imagefolder/<hash>`` (the local
mirror of an ``s3://`` ImageFolder prefix), ``archives/<sha256>`` (an http(s) archive, extracted) and
``weights/<name>`` (a sha256-verified copy of published weights). Named datasets (``fashion-mnist/``,
``cifar10/``...) are not entries: offline, they may have no other source.

Each use of an entry sets its folder's mtime (``touch``); the least recently used entries go first.
An entry used within the grace period is never removed, so a run that is reading it keeps it; removal
renames the folder away first, so a later reader sees it either whole or missing (and fetches it again).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENTRY_KINDS = ("imagefolder", "archives", "weights")
GRACE_S = 600.0  # an entry used in the last 10 minutes may be in use by a running flow


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes of its files
    last_used: float  # epoch seconds: the folder's mtime, set on each use


def writer_temp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses: two runs filling the same cache entry at
    once (two first runs on a fresh machine) each write their own file and ``os.replace`` it into place, so
    neither renames the other's half-written file away."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def touch(entry: Path) -> None:
    """Record a use of ``entry`` (a cache folder)."""
    if entry.is_dir():
        os.utime(entry)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def cache_entries(cache_dir: Path) -> list[CacheEntry]:
    """Every entry of the cache, least recently used first."""
    entries = [CacheEntry(p, _size(p), p.stat().st_mtime)
               for kind in ENTRY_KINDS if (cache_dir / kind).is_dir()
               for p in (cache_dir / kind).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(entries, key=lambda e: (e.last_used, str(e.path)))


def plan_collection(entries: Iterable[CacheEntry], limit_bytes: int, *, keep: Iterable[Path] = (),
                    grace_s: float = GRACE_S, now: float | None = None) -> list[CacheEntry]:
    """The least recently used entries to remove so that the rest fit in ``limit_bytes``; never one in
    ``keep`` or used within ``grace_s`` (so the cache may stay over the cap while those are in use)."""
    entries = sorted(entries, key=lambda e: (e.last_used, str(e.path)))
    now = time.time() if now is None else now
    kept = {p.resolve() for p in keep}
    total = sum(e.size for e in entries)
    doomed = []
    for entry in entries:
        if total <= limit_bytes:
            break
        if entry.path.resolve() in kept or now - entry.last_used < grace_s:
            continue
        doomed.append(entry)
        total -= entry.size
    return doomed


def remove(entry: CacheEntry) -> None:
    """Rename the folder aside (atomic: readers see it whole or not at all), then delete it."""
    aside = entry.path.with_name(f".removing-{entry.path.name}-{uuid.uuid4().hex[:8]}")
    try:
        entry.path.rename(aside)
    except FileNotFoundError:  # another collector got there first
        return
    shutil.rmtree(aside, ignore_errors=True)


def collect(cache_dir: Path, limit_bytes: int, *, keep: Iterable[Path] = (), grace_s: float = GRACE_S,
            dry_run: bool = False) -> tuple[list[CacheEntry], int]:
    """Bring the cache within ``limit_bytes``: (the entries removed, or that would be, bytes left)."""
    entries = cache_entries(cache_dir)
    doomed = plan_collection(entries, limit_bytes, keep=keep, grace_s=grace_s)
    if not dry_run:
        for entry in doomed:
            remove(entry)
    return doomed, sum(e.size for e in entries) - sum(e.size for e in doomed)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
