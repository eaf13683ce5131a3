"""Safe extraction of dataset archives: every way out of the tree is refused by name, caps hold, and a refused
archive leaves nothing behind."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from infra.archives import ArchiveError, archive_suffix, extract, tree_root

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
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("a/evil.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../etc/passwd")
    with pytest.raises(ArchiveError, match="a/evil.png.*leaves the tree"):
        _extract(link, tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


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
