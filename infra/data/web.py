"""Datasets published as an archive at an http(s) URL (``--dataset https://host/path/data.tar.gz``): an
ImageFolder tree (``<class>/<image>`` or ``train|test/<class>/<image>``) in a ``.tar.gz``, ``.tgz``, ``.tar``
or ``.zip``.

The archive is downloaded (streamed, resumable, ``infra.data.download``), checked against ``--dataset-sha256``
when one is pinned, extracted safely (``infra.data.archives``) into ``<cache>/archives/<sha256>/`` and mirrored to
the S3 data bucket as ``archives/<sha256>/<file name>``. Extracted trees are keyed by the archive's sha256,
so a URL that serves new content gets a new tree; ``<cache>/archives/url-<hash>.json`` remembers what each
URL served last, and the next run asks the server whether that is still current (``If-None-Match`` /
``If-Modified-Since``), so an unchanged archive is not downloaded again. A pinned archive already in the
cache is used without asking; when its URL does not answer, it comes from the S3 mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.data.archives import ArchiveError, archive_suffix, extract, tree_root
from infra.data.cache import touch, writer_temp
from infra.data.download import DownloadError, Validators, download, file_digest
from infra.data.spec import DatasetError, Sources
from infra.storage.s3 import object_exists, s3_errors
from infra.uris import public_name, public_uri

SHA256_HEX = 64


@dataclass(frozen=True)
class UrlRecord:
    """What a URL served last: the archive's sha256 and the validators for a conditional request."""

    url: str
    sha256: str
    etag: str | None = None
    last_modified: str | None = None


def check_pin(sha256: str | None) -> str | None:
    """A pinned sha256 as 64 lowercase hex digits, or one line saying what is allowed."""
    if sha256 is None or not sha256.strip():
        return None
    pin = sha256.strip().lower()
    if len(pin) != SHA256_HEX or any(c not in "0123456789abcdef" for c in pin):
        raise DatasetError(f"--dataset-sha256 {sha256[:80]!r} is not a sha256; allowed: 64 hex digits "
                           "(as `sha256sum` prints)")
    return pin


def check_url(url: str) -> None:
    """An archive URL whose name says which archive type it is."""
    if archive_suffix(url.rsplit("/", 1)[-1]) is None:
        raise DatasetError(f"dataset URL {public_uri(url)[:160]!r} does not name an archive; allowed: a URL ending in "
                           ".tar.gz, .tgz, .tar or .zip")


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def _file_name(url: str) -> str:
    return public_name(url)


def _record_path(archives: Path, url: str) -> Path:
    return archives / f"url-{_url_key(url)}.json"


def _read_record(archives: Path, url: str) -> UrlRecord | None:
    try:
        record = UrlRecord(**json.loads(_record_path(archives, url).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return record if record.url == public_uri(url) else None


def _write_record(archives: Path, record: UrlRecord) -> None:
    path = _record_path(archives, record.url)
    tmp = writer_temp(path)
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def _mirror_key(sha256: str, url: str) -> str:
    return f"archives/{sha256}/{_file_name(url)}"


def _tree(archives: Path, sha256: str) -> Path:
    return archives / sha256[:32]


def _from_mirror(url: str, pin: str, dest: Path, src: Sources) -> bool:
    if src.s3 is None or not src.bucket:
        return False
    key = _mirror_key(pin, url)
    with s3_errors(src.endpoint, f"reading s3://{src.bucket}/{key}"):
        if not object_exists(src.s3, src.bucket, key):
            return False
        src.s3.download_file(src.bucket, key, str(dest))
    if file_digest(dest) != pin:
        dest.unlink(missing_ok=True)
        return False
    return True


def archive_tree(url: str, pin: str | None, cache_dir: Path, src: Sources) -> tuple[Path, str]:
    """(the extracted ImageFolder root, the archive's sha256) for the archive at ``url``."""
    check_url(url)
    pin = check_pin(pin)
    archives = cache_dir / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    if pin and _tree(archives, pin).is_dir():  # the pinned content is here: no need to ask anyone
        touch(_tree(archives, pin))
        return tree_root(_tree(archives, pin)), pin
    record = None if pin else _read_record(archives, url)
    current = record is not None and _tree(archives, record.sha256).is_dir()
    scratch = cache_dir / "downloads" / f"{_url_key(url)}-{_file_name(url)}"
    try:
        fetched = download(url, scratch, sha256=pin, conditional=Validators(record.etag, record.last_modified)
                           if current and record else None, limit=src.total_limit)
        sha256, archive, validators = fetched.sha256, fetched.path, fetched.validators
    except DownloadError as exc:
        if exc.transient or not pin or not _from_mirror(url, pin, scratch, src):
            raise
        sha256, archive, validators = pin, scratch, Validators()
    if archive is None:  # 304 Not Modified: what the URL served last is still current
        assert record is not None
        sha256 = record.sha256
    tree = _tree(archives, sha256)
    if archive is not None:
        try:
            if not tree.is_dir():
                extract(archive, tree, member_limit=src.member_limit, total_limit=src.total_limit,
                        name=_file_name(url))
            if src.s3 is not None and src.bucket:
                key = _mirror_key(sha256, url)
                with s3_errors(src.endpoint, f"mirroring to s3://{src.bucket}/{key}"):
                    if not object_exists(src.s3, src.bucket, key):
                        src.s3.upload_file(str(archive), src.bucket, key)
        except ArchiveError as exc:
            raise DatasetError(f"dataset {public_uri(url)[:160]}: {exc}") from None
        finally:
            archive.unlink(missing_ok=True)
        _write_record(archives, UrlRecord(public_uri(url), sha256, validators.etag, validators.last_modified))
    touch(tree)
    return tree_root(tree), sha256
