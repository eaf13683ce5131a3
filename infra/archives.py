"""Safe extraction of dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``).

An archive from a URL is untrusted input. Extraction refuses, naming the member: an absolute name or a
``..`` segment, a link whose target leaves the tree (tar; zip links are written as links only when they stay
inside), device files and FIFOs, a member over the size cap, and a total over the total cap. It extracts
into a scratch folder beside the destination and renames it into place, so a reader sees the tree whole or
not at all. Tar members go through the standard library's ``data`` filter as well (PEP 706).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from infra.errors import HeadbenchError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SKIPPED_NAMES = {"__MACOSX", ".DS_Store"}  # archivers' metadata, never data


class ArchiveError(HeadbenchError):
    """An archive that cannot be extracted safely; names the archive and the member."""


def archive_suffix(name: str) -> str | None:
    """The archive suffix ``name`` ends with (case-insensitive), or None."""
    lower = name.lower().split("?", 1)[0]
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _check_name(archive: Path, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive.name}: member {name[:120]!r} has an absolute path; allowed: relative names")
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member {name[:120]!r} has a '..' segment and would land outside the "
                           "dataset folder; allowed: relative names without '..'")


class _Budget:
    def __init__(self, archive: Path, member_limit: int, total_limit: int) -> None:
        self.archive, self.member_limit, self.total_limit, self.total = archive, member_limit, total_limit, 0

    def take(self, name: str, size: int) -> None:
        if size > self.member_limit:
            raise ArchiveError(f"{self.archive.name}: member {name[:120]!r} is {_mb(size)}, over the "
                               f"{_mb(self.member_limit)} cap per member (HEADBENCH_ARCHIVE_MEMBER_LIMIT_MB)")
        self.total += size
        if self.total > self.total_limit:
            raise ArchiveError(f"{self.archive.name}: more than {_mb(self.total_limit)} once extracted (at member "
                               f"{name[:120]!r}); the cap is the cache's size (HEADBENCH_CACHE_LIMIT_GB)")


def _extract_tar(archive: Path, into: Path, budget: _Budget) -> None:
    def guard(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        _check_name(archive, member.name)
        if member.isdev() or member.isfifo():
            raise ArchiveError(f"{archive.name}: member {member.name[:120]!r} is a device or FIFO; allowed: files, "
                               "folders and links inside the tree")
        if member.issym() or member.islnk():
            target = Path(member.name).parent / member.linkname if member.issym() else Path(member.linkname)
            if member.linkname.startswith("/") or not (into / target).resolve().is_relative_to(into.resolve()):
                raise ArchiveError(f"{archive.name}: link {member.name[:120]!r} -> {member.linkname[:120]!r} "
                                   "leaves the tree; allowed: links to members inside the archive")
        budget.take(member.name, member.size)
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            raise ArchiveError(f"{archive.name}: member {member.name[:120]!r} refused: {exc}") from None

    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter=guard)  # noqa: S202 - every member goes through guard first
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive.name} is not a readable tar archive: {exc}") from None


def _extract_zip(archive: Path, into: Path, budget: _Budget) -> None:
    root = into.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_name(archive, info.filename)
                target = into / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    link = zf.read(info).decode("utf-8", "replace")
                    if link.startswith("/") or not (target.parent / link).resolve().is_relative_to(root):
                        raise ArchiveError(f"{archive.name}: link {info.filename[:120]!r} -> {link[:120]!r} leaves "
                                           "the tree; allowed: links to members inside the archive")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, target)
                    continue
                budget.take(info.filename, info.file_size)
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                # zipfile stops at the declared size and checks the CRC: a member cannot outgrow its header
                with zf.open(info) as src, target.open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > info.file_size:
                            raise ArchiveError(f"{archive.name}: member {info.filename[:120]!r} is larger than "
                                               "its header says")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive.name} is not a readable zip archive: {exc}") from None


def extract(archive: Path, dest: Path, *, member_limit: int, total_limit: int, name: str | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (which must not exist yet), all or nothing. ``name`` is the archive's
    original name when the file on disk has another (it decides the format)."""
    suffix = archive_suffix(name or archive.name)
    if suffix is None:
        raise ArchiveError(f"{name or archive.name}: unknown archive type; allowed: {', '.join(ARCHIVE_SUFFIXES)}")
    scratch = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, mode=0o700)
    budget = _Budget(Path(name or archive.name), member_limit, total_limit)
    try:
        if suffix == ".zip":
            _extract_zip(archive, scratch, budget)
        else:
            _extract_tar(archive, scratch, budget)
        os.replace(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def tree_root(folder: Path) -> Path:
    """The ImageFolder root inside an extracted archive: archivers often wrap everything in one folder
    (``flowers/<class>/...``), so descend while a folder holds exactly one folder and no files."""
    while True:
        entries = [p for p in folder.iterdir() if p.name not in SKIPPED_NAMES and not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) != 1 or len(entries) != 1 or dirs[0].name in ("train", "test"):
            return folder
        folder = dirs[0]
