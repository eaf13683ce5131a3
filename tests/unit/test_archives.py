"""Safe extraction of dataset archives: every way out of the tree is refused by name, caps hold, and a refused
archive leaves nothing behind."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from infra.data.archives import ArchiveError, archive_suffix, extract, tree_root

MB = 1_000_000


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _extract(archive: Path, dest: Path, member_limit: int = 10 * MB, total_limit: int = 50 * MB) -> Path:
    return extract(archive, dest, member_limit=member_limit, total_limit=total_limit)


def test_suffixes() -> None:
    assert [archive_suffix(n) for n in ("a.tar.gz", "A.TGZ", "b.tar", "c.zip", "d.tar.gz?x=1", "e.rar")] == [
        ".tar.gz", ".tgz", ".tar", ".zip", ".tar.gz", None]


@pytest.mark.parametrize("mode,name", [("w:gz", "flowers.tar.gz"), ("w:gz", "flowers.tgz"), ("w", "flowers.tar")])
def test_a_tar_imagefolder_is_extracted_and_its_wrapper_folder_skipped(tmp_path: Path, mode: str, name: str) -> None:
    archive = _tar(tmp_path / name, [("flowers/daisy/1.png", b"a"), ("flowers/rose/2.png", b"bb"),
                                     _link("flowers/rose/3.png", "2.png")], mode)
    tree = _extract(archive, tmp_path / "out")
    root = tree_root(tree)
    assert root == tmp_path / "out" / "flowers"
    assert (root / "daisy" / "1.png").read_bytes() == b"a" and (root / "rose" / "3.png").read_bytes() == b"bb"


def test_a_zip_imagefolder_with_splits_is_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("data/train/a/1.png", "data/train/b/2.png", "data/test/a/3.png", "__MACOSX/._x"):
            zf.writestr(name, b"x")
    root = tree_root(_extract(archive, tmp_path / "out"))
    assert root == tmp_path / "out" / "data" and {p.name for p in root.iterdir()} == {"train", "test"}


@pytest.mark.parametrize(("member", "words"), [
    (("../evil.png", b"x"), ["../evil.png", "'..'"]),
    (("a/../../evil.png", b"x"), ["a/../../evil.png", "'..'"]),
    (("/etc/evil.png", b"x"), ["/etc/evil.png", "absolute"]),
    (_link("a/evil.png", "/etc/passwd"), ["a/evil.png", "/etc/passwd", "leaves the tree"]),
    (_link("a/evil.png", "../../../etc/passwd"), ["a/evil.png", "leaves the tree"]),
    (_link("a/hard.png", "../outside", tarfile.LNKTYPE), ["a/hard.png", "leaves the tree"]),
])
def test_tar_members_that_leave_the_tree_are_refused_by_name(tmp_path: Path, member, words: list[str]) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [("a/ok.png", b"ok"), member])
    with pytest.raises(ArchiveError) as err:
        _extract(archive, tmp_path / "out")
    assert all(w in str(err.value) for w in words) and "bad.tar.gz" in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]  # nothing half-extracted
    assert not (tmp_path.parent / "evil.png").exists()


def test_device_files_are_refused(tmp_path: Path) -> None:
    device = tarfile.TarInfo("a/dev")
    device.type = tarfile.CHRTYPE
    with pytest.raises(ArchiveError, match="device or FIFO"):
        _extract(_tar(tmp_path / "dev.tar", [device], "w"), tmp_path / "out")


def test_zip_members_that_leave_the_tree_are_refused_by_name(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/ok.png", b"ok")
        zf.writestr("../../evil.png", b"x")
    with pytest.raises(ArchiveError, match=r"\.\./\.\./evil\.png"):
        _extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _zip_link(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


@pytest.mark.parametrize("target", ["../../../etc/passwd", "1.png"])
def test_a_zip_never_creates_a_link_even_one_inside_the_tree(tmp_path: Path, target: str) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/1.png", b"x")
        _zip_link(zf, "a/evil.png", target)
    with pytest.raises(ArchiveError, match=r"link.zip: member 'a/evil.png' is a symbolic link; allowed in a zip"):
        _extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.zip"]


def _chain(levels: int) -> list[tuple[str, str | None]]:
    """The symlink chain of the lockdown issue: a real folder q/, links b -> p/q, a -> b/../.. (one more
    '..' per level), p -> ., then a file a/X. Each link resolves inside the tree when it is created; once p
    exists, a points ``levels`` folder(s) above it. (name, link target or None for a file/folder)."""
    return [("q/", None), ("b", "p/q"), ("a", "b/" + "../" * levels + ".."), ("p", "."), ("a/X", None)]


@pytest.mark.parametrize("levels", [1, 4])
def test_the_symlink_chain_is_refused_as_zip_and_as_tar(tmp_path: Path, levels: int) -> None:
    deep = tmp_path / "l1" / "l2" / "l3" / "l4" / "l5"  # the extraction happens 5 levels down
    deep.mkdir(parents=True)
    zipped, tarred = deep / "chain.zip", deep / "chain.tar"
    with zipfile.ZipFile(zipped, "w") as zf, tarfile.open(tarred, "w") as tar:
        for name, target in _chain(levels):
            if target is not None:
                _zip_link(zf, name, target)
                tar.addfile(_link(name, target))
            elif name.endswith("/"):
                zf.writestr(name, b"")
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                zf.writestr(name, b"escaped")
                info = tarfile.TarInfo(name)
                info.size = 7
                tar.addfile(info, io.BytesIO(b"escaped"))
    with pytest.raises(ArchiveError, match=r"chain.zip: member 'b' is a symbolic link"):
        _extract(zipped, deep / "out-zip")
    with pytest.raises(ArchiveError, match=r"chain.tar: link 'a' leaves the tree") as err:
        _extract(tarred, deep / "out-tar")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in deep.iterdir()) == ["chain.tar", "chain.zip"]
    assert not [p for p in tmp_path.rglob("X")], "the chain's file was written somewhere"


def test_the_long_path_and_symlink_pattern_of_the_2025_tarfile_cves(tmp_path: Path) -> None:
    """CVE-2025-4517's shape: folders with names near NAME_MAX and a link to each, so that the links' expansion
    outgrows PATH_MAX (where ``os.path.realpath`` stops resolving), then a link climbing back through them
    and a file written through it."""
    comp, steps = "d" * 247, "abcdefghijklmnop"
    members: list[tarfile.TarInfo | tuple[str, bytes]] = []
    path = ""
    for step in steps:
        folder = tarfile.TarInfo(f"{path}{comp}")
        folder.type = tarfile.DIRTYPE
        members += [folder, _link(f"{path}{step}", comp)]
        path += comp + "/"
    long_link = "/".join(steps) + "/" + "l" * 254
    members.append(_link(long_link, "../" * len(steps)))
    members.append(_link("escape", f"{long_link}/../../../../etc"))
    members.append(("escape/evil", b"x"))
    archive = _tar(tmp_path / "cve.tar", members, "w")
    with pytest.raises(ArchiveError, match=r"cve.tar: (link|member) .* (leaves the tree|lies under a link)"):
        _extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cve.tar"]


def test_tar_links_to_files_become_copies_and_links_to_folders_are_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar", [("c/1.png", b"one"), _link("c/2.png", "1.png"), _link("c/3.png", "2.png"),
                                         _link("d/4.png", "c/1.png", tarfile.LNKTYPE)], "w")
    tree = _extract(archive, tmp_path / "out")
    for name in ("c/2.png", "c/3.png", "d/4.png"):
        assert not (tree / name).is_symlink() and (tree / name).read_bytes() == b"one", name
    folder = _tar(tmp_path / "dir.tar", [("c/1.png", b"one"), _link("e", "c")], "w")
    with pytest.raises(ArchiveError, match=r"dir.tar: link 'e' -> 'c' names a folder"):
        _extract(folder, tmp_path / "out2")
    under = _tar(tmp_path / "under.tar", [("c/1.png", b"one"), _link("e", "c"), ("e/2.png", b"two")], "w")
    with pytest.raises(ArchiveError, match=r"under.tar: member 'e/2.png' lies under a link"):
        _extract(under, tmp_path / "out3")
    dangling = _tar(tmp_path / "dangling.tar", [("c/1.png", b"one"), _link("c/2.png", "nothing.png")], "w")
    with pytest.raises(ArchiveError, match=r"dangling.tar: link 'c/2.png' -> 'nothing.png' points at nothing"):
        _extract(dangling, tmp_path / "out4")
    loop = _tar(tmp_path / "loop.tar", [("c/1.png", b"one"), _link("x", "y"), _link("y", "x")], "w")
    with pytest.raises(ArchiveError, match=r"loop.tar: link '.' leaves the tree .* loops"):
        _extract(loop, tmp_path / "out5")
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"out"}


def test_size_caps_per_member_and_in_total(tmp_path: Path) -> None:
    big = _tar(tmp_path / "big.tar.gz", [("a/huge.png", b"\0" * (2 * MB))])
    with pytest.raises(ArchiveError, match=r"a/huge.png.*2\.0 MB, over the 1\.0 MB cap"):
        _extract(big, tmp_path / "out", member_limit=MB)
    many = _tar(tmp_path / "many.tar.gz", [(f"a/{i}.png", b"\0" * (MB // 2)) for i in range(5)])
    with pytest.raises(ArchiveError, match=r"more than 2\.0 MB once extracted"):
        _extract(many, tmp_path / "out", total_limit=2 * MB)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.png", b"\0" * (3 * MB))
    assert bomb.stat().st_size < 50_000
    with pytest.raises(ArchiveError, match=r"a/zeros.png.*3\.0 MB"):
        _extract(bomb, tmp_path / "out", member_limit=MB)
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not a tar")
    with pytest.raises(ArchiveError, match="fake.tar.gz is not a readable tar archive"):
        _extract(fake, tmp_path / "out")
    with pytest.raises(ArchiveError, match="unknown archive type"):
        _extract(tmp_path / "x.rar", tmp_path / "out")
