"""Safe extraction of dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``).

An archive from a URL is untrusted input, and the interpreter's own guards are not relied on (``tarfile``'s
``data`` filter had bypasses fixed only in 3.11.13, CVE-2025-4517 and related). Extraction first reads the
archive's whole index and plans every write on it:

- a name that is absolute or has a ``..`` segment is refused;
- links are resolved inside the archive's own namespace, after all of them are known, as ``realpath``
  would resolve them on disk: a link whose target climbs above the root (alone or through a chain such as
  ``b -> p/q``, ``a -> b/../..``, ``p -> .``), points at nothing in the archive, or at a folder is refused,
  and so is any member that lies under a link;
- a tar link to a file becomes a copy of that file: nothing is ever written as a link, so every member's
  final path is its own name under the root, checked again before the file is opened (``O_NOFOLLOW``,
  ``O_EXCL``). A zip never carries links: one is refused by name;
- device files and FIFOs, a member over the size cap, and a total over the total cap are refused.

It extracts into a scratch folder beside the destination and renames it into place, so a reader sees the
tree whole or not at all; a refused archive leaves nothing behind.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from infra.errors import HeadbenchError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SKIPPED_NAMES = {"__MACOSX", ".DS_Store"}  # archivers' metadata, never data
MAX_LINK_HOPS = 40  # what Linux allows a path lookup (ELOOP past it)
CHUNK = 1 << 20


class ArchiveError(HeadbenchError):
    """An archive that cannot be extracted safely; names the archive and the member."""


def archive_suffix(name: str) -> str | None:
    """The archive suffix ``name`` ends with (case-insensitive), or None."""
    lower = name.lower().split("?", 1)[0]
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), None)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _q(name: str) -> str:
    return repr(name[:120])


@dataclass(frozen=True)
class Member:
    """One archive entry, format-free: ``kind`` is file | dir | symlink | hardlink; ``link`` is a symlink's
    target (relative to its folder) or a hard link's (relative to the root); ``open`` reads a file's bytes."""

    name: str
    kind: str
    size: int = 0
    link: str = ""
    open: Callable[[], IO[bytes]] | None = None


def _normalized(archive: str, name: str) -> str:
    """``name`` as a relative POSIX path without ``.`` or empty segments ('' for the root itself); refuses an
    absolute name or one with a ``..`` segment, in either slash."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {_q(name)} has an absolute path; allowed: relative names")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{archive}: member {_q(name)} has a '..' segment and would land outside the dataset "
                           "folder; allowed: relative names without '..'")
    return "/".join(parts)


class _Namespace:
    """The archive's tree as the index describes it: where each name would resolve once every member is on
    disk (symlinks followed component by component, as the kernel does), computed before anything is
    written."""

    def __init__(self, archive: str, members: dict[str, Member]) -> None:
        self.archive, self.members = archive, members
        self.symlinks = {name: m.link for name, m in members.items() if m.kind == "symlink"}
        # every folder a member's path implies ("a/b/c" -> "a/", "a/b/"), with its trailing slash
        self.folders = {name[:i + 1] for name in members for i, c in enumerate(name) if c == "/"}

    def resolve(self, path: str, what: str) -> str:
        """The link-free path ``path`` (relative to the root) ends at; refuses one that climbs above the root
        or loops. ``what`` names the member the lookup is for."""
        pending, done, hops = path.split("/"), [], 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise ArchiveError(f"{self.archive}: link {_q(what)} leaves the tree (through {_q(path)}); "
                                       "allowed: links to files inside the archive")
                done.pop()
                continue
            here = "/".join([*done, part])
            if here in self.symlinks:
                hops += 1
                target = self.symlinks[here]
                if target.startswith(("/", "\\")) or hops > MAX_LINK_HOPS:
                    why = "is absolute" if hops <= MAX_LINK_HOPS else f"loops (over {MAX_LINK_HOPS} links)"
                    raise ArchiveError(f"{self.archive}: link {_q(what)} leaves the tree ({_q(here)} -> "
                                       f"{_q(target)} {why}); allowed: links to files inside the archive")
                pending = target.replace("\\", "/").split("/") + pending  # relative to the link's folder: done
                continue
            done.append(part)
        return "/".join(done)

    def check_parent(self, name: str) -> None:
        """A member is written at its own name: refuse one whose folder passes through a link."""
        parent = posixpath.dirname(name)
        if parent and self.resolve(parent, name) != parent:
            raise ArchiveError(f"{self.archive}: member {_q(name)} lies under a link; allowed: files and folders "
                               "whose path holds no link")

    def link_path(self, member: Member) -> str:
        """Where a link (or a chain of them) ends, as a link-free path; refuses one that leaves the tree."""
        if member.link.startswith(("/", "\\")):
            raise ArchiveError(f"{self.archive}: link {_q(member.name)} -> {_q(member.link)} leaves the tree; "
                               "allowed: links to files inside the archive")
        start = posixpath.join(posixpath.dirname(member.name), member.link) if member.kind == "symlink" \
            else member.link
        return self.resolve(start, member.name)

    def link_file(self, member: Member, final: str) -> Member:
        """The file member at ``final``; refuses a folder (one named or implied by a member's path) or a
        name the archive does not hold."""
        target = self.members.get(final)
        if (target is not None and target.kind == "dir") or (final + "/") in self.folders or not final:
            raise ArchiveError(f"{self.archive}: link {_q(member.name)} -> {_q(member.link)} names a folder; "
                               "allowed: links to files inside the archive")
        if target is None or target.kind != "file":
            raise ArchiveError(f"{self.archive}: link {_q(member.name)} -> {_q(member.link)} points at nothing in "
                               "the archive; allowed: links to files inside the archive")
        return target


class _Budget:
    def __init__(self, archive: str, member_limit: int, total_limit: int) -> None:
        self.archive, self.member_limit, self.total_limit, self.total = archive, member_limit, total_limit, 0

    def take(self, name: str, size: int) -> None:
        if size > self.member_limit:
            raise ArchiveError(f"{self.archive}: member {_q(name)} is {_mb(size)}, over the "
                               f"{_mb(self.member_limit)} cap per member (HEADBENCH_ARCHIVE_MEMBER_LIMIT_MB)")
        self.total += size
        if self.total > self.total_limit:
            raise ArchiveError(f"{self.archive}: more than {_mb(self.total_limit)} once extracted (at member "
                               f"{_q(name)}); the cap is the cache's size (HEADBENCH_CACHE_LIMIT_GB)")


def _final_path(archive: str, root: Path, name: str) -> Path:
    """``root / name`` once its folder is known to resolve inside ``root`` (no link can be on the way: none is
    ever written, but the check is ours, not an assumption)."""
    target = root / name
    if not Path(os.path.realpath(target.parent)).is_relative_to(root):
        raise ArchiveError(f"{archive}: member {_q(name)} would be written outside the dataset folder")
    return target


def _write(archive: str, root: Path, member: Member, src: IO[bytes]) -> None:
    target = _final_path(archive, root, member.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as dst:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > member.size:  # the cap was taken on the declared size: a member cannot outgrow it
                raise ArchiveError(f"{archive}: member {_q(member.name)} is larger than its header says")
            dst.write(chunk)


def _extract_members(archive: str, members: list[Member], root: Path, budget: _Budget) -> None:
    """Plan on the whole index, then write: folders, files, then each link as a copy of its target file."""
    latest = {m.name: m for m in members if m.name}  # a name given twice: the later entry wins, as in tar
    space = _Namespace(archive, latest)
    # where every link ends first (a link that climbs out is named as such), then what may be written
    ends = {m.name: space.link_path(m) for m in latest.values() if m.kind in ("symlink", "hardlink")}
    for member in latest.values():
        space.check_parent(member.name)
    links = [(latest[name], space.link_file(latest[name], final)) for name, final in ends.items()]
    for member in latest.values():
        if member.kind == "dir":
            _final_path(archive, root, member.name).mkdir(parents=True, exist_ok=True)
        elif member.kind == "file":
            budget.take(member.name, member.size)
            assert member.open is not None
            with member.open() as src:
                _write(archive, root, member, src)
    for link, target in links:
        budget.take(link.name, target.size)
        with _final_path(archive, root, target.name).open("rb") as src:
            _write(archive, root, Member(link.name, "file", target.size), src)


def _tar_members(archive: str, tar: tarfile.TarFile) -> Iterator[Member]:
    for info in tar.getmembers():
        name = _normalized(archive, info.name)
        if info.isdev() or info.isfifo():
            raise ArchiveError(f"{archive}: member {_q(info.name)} is a device or FIFO; allowed: files, folders "
                               "and links to files inside the tree")
        if info.issym() or info.islnk():
            yield Member(name, "symlink" if info.issym() else "hardlink", link=info.linkname)
        elif info.isdir():
            yield Member(name, "dir")
        elif info.isfile():
            yield Member(name, "file", info.size, open=lambda info=info: tar.extractfile(info))  # type: ignore[misc]
        else:
            raise ArchiveError(f"{archive}: member {_q(info.name)} has an unsupported type; allowed: files, "
                               "folders and links to files inside the tree")


def _zip_members(archive: str, zf: zipfile.ZipFile) -> Iterator[Member]:
    for info in zf.infolist():
        name = _normalized(archive, info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{archive}: member {_q(info.filename)} is a symbolic link; allowed in a zip: files "
                               "and folders")
        if info.is_dir():
            yield Member(name, "dir")
        else:  # zipfile stops at the declared size and checks the CRC
            yield Member(name, "file", info.file_size, open=lambda info=info: zf.open(info))  # type: ignore[misc]


@contextmanager
def _reading(archive: str, kind: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as exc:
        raise ArchiveError(f"{archive} is not a readable {kind} archive: {exc}") from None


def extract(archive: Path, dest: Path, *, member_limit: int, total_limit: int, name: str | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (which must not exist yet), all or nothing. ``name`` is the archive's
    original name when the file on disk has another (it decides the format)."""
    label = name or archive.name
    suffix = archive_suffix(label)
    if suffix is None:
        raise ArchiveError(f"{label}: unknown archive type; allowed: {', '.join(ARCHIVE_SUFFIXES)}")
    scratch = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, mode=0o700)
    root = Path(os.path.realpath(scratch))
    budget = _Budget(Path(label).name, member_limit, total_limit)
    shown = Path(label).name
    try:
        if suffix == ".zip":
            with _reading(shown, "zip", (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError)), \
                    zipfile.ZipFile(archive) as zf:
                _extract_members(shown, list(_zip_members(shown, zf)), root, budget)
        else:
            with _reading(shown, "tar", (tarfile.TarError, EOFError, OSError)), tarfile.open(archive) as tar:
                _extract_members(shown, list(_tar_members(shown, tar)), root, budget)
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
