"""HTTP(S) downloads of dataset files: streamed to ``<dest>.part`` beside the cache entry, resumed with an HTTP
Range request after an interruption (where the server allows it), checked against a pinned checksum, then
moved into place atomically, so a reader sees a file whole or not at all.

Progress goes to whoever listens in this context (``watching(fn)``): the CLI's live display, and the data
task's Prefect log every few seconds (``every``). A connection that cannot be opened (refused, unknown host,
HTTP 4xx) fails at once with one line; a transfer cut short is resumed here up to ``RESUMES`` times, and
fails as transient (the task may retry it) only when it keeps breaking.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from infra.errors import HeadbenchError
from infra.listeners import Listeners
from infra.uris import basic_auth, public_name, public_uri

log = logging.getLogger(__name__)

CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 10.0  # also the longest wait for the next bytes of a transfer
RESUMES = 3  # in-call Range resumes of a transfer that broke off
SCHEMES = ("http://", "https://")


class DownloadError(HeadbenchError):
    """A URL that could not be fetched, or whose content is not what was pinned; names the URL."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class DownloadProgress:
    url: str
    done: int  # bytes on disk (a resumed transfer counts what the earlier attempt left)
    total: int | None  # None: the server sent no length
    rate: float  # bytes per second over this transfer
    finished: bool = False

    def line(self) -> str:
        """'flowers.tar.gz: 12.3 of 40.0 MB (31%), 5.1 MB/s, ETA 5 s'."""
        name = public_name(self.url)
        size = f"{self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB ({100 * self.done / max(1, self.total):.0f}%)" \
            if self.total else f"{self.done / 1e6:.1f} MB"
        eta = f", ETA {(self.total - self.done) / self.rate:.0f} s" if self.total and self.rate > 0 and \
            not self.finished else ""
        return f"{name}: {size}, {self.rate / 1e6:.1f} MB/s{eta}"


Listener = Callable[[DownloadProgress], object]
_listeners: Listeners[Listener] = Listeners("headbench_download_listeners")
# ``with watching(fn): ...``: ``fn(progress)`` as the downloads run inside the block advance
watching = _listeners.subscribed


def every(seconds: float, emit: Callable[[str], object]) -> Listener:
    """A listener that emits a download's progress line at most every ``seconds``, and its last one."""
    last: dict[str, float] = {}

    def listen(note: DownloadProgress) -> None:
        now = time.monotonic()
        if note.finished or now - last.get(note.url, 0.0) >= seconds:
            last[note.url] = now
            emit(("downloaded " if note.finished else "downloading ") + note.line())

    return listen


@dataclass(frozen=True)
class Validators:
    """What the server said identifies the content (for conditional requests and safe resumes)."""

    etag: str | None = None
    last_modified: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"etag": self.etag, "last_modified": self.last_modified}


@dataclass(frozen=True)
class Fetched:
    path: Path | None  # None when the server answered 304 Not Modified to a conditional request
    sha256: str
    size: int
    validators: Validators

    @property
    def not_modified(self) -> bool:
        return self.path is None


def _hash_file(path: Path, algorithm: str) -> hashlib._Hash:
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    return _hash_file(path, algorithm).hexdigest()


def _short(url: str) -> str:
    """The URL as an error line may show it: no credentials or query string, at most 160 characters."""
    url = public_uri(url)
    return url if len(url) <= 160 else url[:157] + "..."


def _request(url: str, headers: dict[str, str]) -> urllib.request.Request:
    """The request for ``url``: credentials in its userinfo (``https://user:pass@host/...``) go as HTTP basic
    auth, which urllib would otherwise take for part of the host name."""
    parts = urlsplit(url)
    if parts.username is not None:
        headers = {**headers, **basic_auth(f"{unquote(parts.username)}:{unquote(parts.password or '')}")}
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return urllib.request.Request(url, headers={"User-Agent": "headbench", **headers})  # noqa: S310 - http(s)


def _open(url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """The response, or one line naming the URL and why it cannot be opened."""
    try:
        request = _request(url, headers)
    except ValueError as exc:  # a port that is no number, a malformed host
        raise DownloadError(f"{_short(url)} is not a valid URL: {exc}") from None
    try:
        return urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)  # noqa: S310 - scheme checked
    except urllib.error.HTTPError as exc:
        if exc.code in (304, 416):
            return exc  # type: ignore[return-value]  # handled by the caller
        raise DownloadError(f"{_short(url)}: HTTP {exc.code} {exc.reason}",
                            transient=exc.code in (408, 429) or exc.code >= 500) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        why = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise DownloadError(f"{_short(url)} is unreachable: {why}", transient=isinstance(reason, TimeoutError)) \
            from None
    except TimeoutError:
        raise DownloadError(f"{_short(url)}: no answer within {CONNECT_TIMEOUT_S:.0f} s", transient=True) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"{_short(url)} cannot be fetched: {exc}") from None


def _validators(resp: http.client.HTTPResponse) -> Validators:
    return Validators(resp.headers.get("ETag"), resp.headers.get("Last-Modified"))


def download(url: str, dest: Path, *, sha256: str | None = None, md5: str | None = None,
             conditional: Validators | None = None, limit: int | None = None) -> Fetched:
    """Fetch ``url`` into ``dest`` (atomically); resume ``dest.part`` left by an interrupted attempt.

    ``sha256`` / ``md5`` pin the content: a mismatch deletes the partial file and raises, and nothing is
    cached. ``conditional`` (what an earlier response said) makes the request conditional: a 304 returns a
    ``Fetched`` with ``path=None`` and writes nothing. One process at a time downloads into ``dest``'s
    folder (an exclusive lock on the folder itself, so no lock file is left behind): two runs on a fresh
    cache would otherwise append to one ``.part``. ``limit`` caps the bytes taken: a larger announced length
    is refused before the body is read, and a response without one is cut at the cap; either way the
    partial file is removed."""
    if not url.startswith(SCHEMES):
        raise DownloadError(f"{_short(url)}: only http:// and https:// URLs are downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released on close, also when this process dies
        return _download(url, dest, sha256=sha256, md5=md5, conditional=conditional, limit=limit)
    finally:
        os.close(folder)


def _over_cap(url: str, size: str, limit: int, part: Path, meta: Path) -> DownloadError:
    """The one-line refusal of a download over the cap; what was written of it is removed."""
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    return DownloadError(f"{_short(url)} {size}, over the {limit / 1e6:.1f} MB download cap (the cache's size, "
                         "HEADBENCH_CACHE_LIMIT_GB); nothing was kept")


def _download(url: str, dest: Path, *, sha256: str | None, md5: str | None,
              conditional: Validators | None, limit: int | None) -> Fetched:
    part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    started = time.monotonic()
    for attempt in range(RESUMES + 1):
        have = part.stat().st_size if part.exists() else 0
        saved = Validators(**json.loads(meta.read_text())) if have and meta.exists() else Validators()
        headers: dict[str, str] = {}
        if have:  # resume, but only the same content: If-Range falls back to a full 200 when it changed
            headers["Range"] = f"bytes={have}-"
            if saved.etag or saved.last_modified:
                headers["If-Range"] = saved.etag or saved.last_modified or ""
        elif conditional is not None:
            if conditional.etag:
                headers["If-None-Match"] = conditional.etag
            if conditional.last_modified:
                headers["If-Modified-Since"] = conditional.last_modified
        resp = _open(url, headers)
        with resp:
            if resp.status == 304:
                return Fetched(None, "", 0, conditional or Validators())
            if resp.status == 416:  # the part already holds every byte (or more): start over to be sure
                part.unlink(missing_ok=True)
                continue
            if resp.status == 206:
                if not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    part.unlink(missing_ok=True)  # not the bytes asked for: start over
                    continue
                offset = have
            else:  # 200: the server ignored the Range (or the content changed): from the start
                offset = 0
            validators = _validators(resp)
            meta.write_text(json.dumps(validators.as_dict()))
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if limit is not None and total is not None and total > limit:
                raise _over_cap(url, f"is {total / 1e6:.1f} MB (Content-Length)", limit, part, meta)
            try:
                _stream(resp, part, offset, total, url, started, limit)
            except _CapReached:
                raise _over_cap(url, f"sent more than {limit / 1e6:.1f} MB without announcing a length",
                                limit or 0, part, meta) from None
            except (OSError, http.client.HTTPException) as exc:  # cut short: the part stays for a resume
                if attempt == RESUMES:
                    raise DownloadError(f"{_short(url)}: the transfer broke off {RESUMES + 1} times "
                                        f"({exc.__class__.__name__}); {part.stat().st_size} bytes kept for a "
                                        "resume", transient=True) from None
                log.info("download of %s broke off at %d bytes (%s); resuming", url, part.stat().st_size, exc)
                continue
        size = part.stat().st_size
        if total is not None and size != total:
            if attempt == RESUMES:
                raise DownloadError(f"{_short(url)}: got {size} bytes, the server announced {total}",
                                    transient=True)
            continue
        return _verified(url, part, meta, dest, sha256, md5, validators)
    raise DownloadError(f"{_short(url)}: could not complete the download", transient=True)


class _CapReached(Exception):
    """The body outgrew the download cap."""


def _stream(resp: http.client.HTTPResponse, part: Path, offset: int, total: int | None, url: str,
            started: float, limit: int | None) -> None:
    listeners = _listeners.current()
    last_note = time.monotonic()
    done, fresh = offset, 0
    with part.open("r+b" if offset else "wb") as fh:
        fh.seek(offset)
        fh.truncate()
        # never more than one byte past the cap is read: that byte is what proves the body is over it
        while chunk := resp.read(CHUNK if limit is None else max(1, min(CHUNK, limit + 1 - done))):
            if limit is not None and done + len(chunk) > limit:
                raise _CapReached
            fh.write(chunk)
            done += len(chunk)
            fresh += len(chunk)
            now = time.monotonic()
            if listeners and now - last_note >= 0.2:
                last_note = now
                note = DownloadProgress(url, done, total, fresh / max(1e-6, now - started))
                for listener in listeners:
                    listener(note)
    rate = fresh / max(1e-6, time.monotonic() - started)
    final = DownloadProgress(url, done, total, rate, finished=True)
    for listener in listeners:
        listener(final)


def _verified(url: str, part: Path, meta: Path, dest: Path, sha256: str | None, md5: str | None,
              validators: Validators) -> Fetched:
    actual = file_digest(part)
    wrong = None
    if sha256 and actual != sha256.lower():
        wrong = f"sha256 {actual}, pinned {sha256.lower()}"
    elif md5 and (got := file_digest(part, "md5")) != md5.lower():
        wrong = f"md5 {got}, published {md5.lower()}"
    if wrong:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise DownloadError(f"{_short(url)} is not the pinned content ({wrong}); nothing was cached")
    size = part.stat().st_size
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    return Fetched(dest, actual, size, validators)
