"""HTTP downloads against a real loopback server (tests/http_server.py): streamed, resumed with Range after a
dropped connection or an earlier interrupted attempt, pinned by sha256, conditional, and one-line failures."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from infra.data.download import DownloadError, DownloadProgress, Validators, download, watching
from infra.processes.supervise import free_port
from tests.http_server import serving

BLOB = os.urandom(3 * 1024 * 1024 + 123)  # three and a bit chunks
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.tar.gz").write_bytes(BLOB)
    with serving(root) as (base, state):
        yield base, state


def test_a_download_is_streamed_verified_and_moved_into_place(served, tmp_path: Path) -> None:
    base, _ = served
    notes: list[DownloadProgress] = []
    dest = tmp_path / "cache" / "data.tar.gz"
    with watching(notes.append):
        fetched = download(f"{base}/data.tar.gz", dest, sha256=SHA)
    assert fetched.path == dest and dest.read_bytes() == BLOB and fetched.sha256 == SHA and fetched.size == len(BLOB)
    assert not dest.with_name("data.tar.gz.part").exists() and not dest.with_name("data.tar.gz.part.json").exists()
    assert notes and notes[-1].finished and notes[-1].done == notes[-1].total == len(BLOB)
    assert "data.tar.gz" in notes[-1].line() and "MB" in notes[-1].line()


def test_a_wrong_pin_is_one_line_and_caches_nothing(served, tmp_path: Path) -> None:
    base, _ = served
    dest = tmp_path / "data.tar.gz"
    with pytest.raises(DownloadError) as err:
        download(f"{base}/data.tar.gz", dest, sha256="0" * 64)
    message = str(err.value)
    assert "\n" not in message and "sha256" in message and SHA in message and "0" * 64 in message
    assert not err.value.transient
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]  # no file, no partial file


def test_a_dropped_connection_is_resumed_with_a_range_request(served, tmp_path: Path) -> None:
    base, state = served
    state.cut_once["/data.tar.gz"] = 1_000_000
    dest = tmp_path / "data.tar.gz"
    fetched = download(f"{base}/data.tar.gz", dest, sha256=SHA)
    assert fetched.path is not None and dest.read_bytes() == BLOB
    statuses = [(status, headers.get("Range")) for _, headers, status in state.requests]
    assert statuses == [(200, None), (206, "bytes=1000000-")]


def test_an_interrupted_earlier_attempt_is_resumed_not_restarted(served, tmp_path: Path) -> None:
    base, state = served
    dest = tmp_path / "data.tar.gz"
    # what a process killed mid-transfer leaves: the bytes so far and the validators of that response
    dest.with_name("data.tar.gz.part").write_bytes(BLOB[:2_000_000])
    dest.with_name("data.tar.gz.part.json").write_text(json.dumps({"etag": f'"{SHA[:16]}"', "last_modified": None}))
    download(f"{base}/data.tar.gz", dest, sha256=SHA)
    assert dest.read_bytes() == BLOB
    assert [(h.get("Range"), h.get("If-Range"), s) for _, h, s in state.requests] == [
        ("bytes=2000000-", f'"{SHA[:16]}"', 206)]  # only the same content is resumed


def test_a_changed_file_is_not_spliced_onto_an_old_partial_one(served, tmp_path: Path) -> None:
    base, state = served
    dest = tmp_path / "data.tar.gz"
    dest.with_name("data.tar.gz.part").write_bytes(b"x" * 2_000_000)  # from another version of the file
    dest.with_name("data.tar.gz.part.json").write_text(json.dumps({"etag": '"old"', "last_modified": None}))
    download(f"{base}/data.tar.gz", dest, sha256=SHA)
    assert dest.read_bytes() == BLOB and state.requests[-1][2] == 200  # If-Range failed: the whole file


def test_a_server_without_ranges_gets_a_full_restart(served, tmp_path: Path) -> None:
    base, state = served
    state.ranges = False
    state.cut_once["/data.tar.gz"] = 500_000
    dest = tmp_path / "data.tar.gz"
    download(f"{base}/data.tar.gz", dest, sha256=SHA)
    assert dest.read_bytes() == BLOB and [s for _, _, s in state.requests] == [200, 200]


def test_a_conditional_request_for_unchanged_content_downloads_nothing(served, tmp_path: Path) -> None:
    base, state = served
    first = download(f"{base}/data.tar.gz", tmp_path / "a")
    again = download(f"{base}/data.tar.gz", tmp_path / "b", conditional=first.validators)
    assert again.not_modified and not (tmp_path / "b").exists() and state.requests[-1][2] == 304
    changed = download(f"{base}/data.tar.gz", tmp_path / "c", conditional=Validators('"other"', None))
    assert changed.path is not None and changed.sha256 == SHA


def test_an_unreachable_host_or_a_missing_file_fails_at_once_in_one_line(served, tmp_path: Path) -> None:
    base, _ = served
    port = free_port()
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{port}/data.tar.gz", tmp_path / "x")
    assert time.monotonic() - started < 30  # generous (it takes milliseconds): no retry loop with backoff
    assert f"127.0.0.1:{port}" in str(err.value) and "unreachable" in str(err.value) and "\n" not in str(err.value)
    assert not err.value.transient  # nobody listens: retrying will not help
    with pytest.raises(DownloadError, match=r"HTTP 404"):
        download(f"{base}/nope.tar.gz", tmp_path / "y")
    with pytest.raises(DownloadError, match="only http"):
        download("ftp://example.org/x.tar", tmp_path / "z")


def test_two_downloads_into_one_cache_entry_at_once_both_end_with_the_whole_file(served, tmp_path: Path) -> None:
    """Two runs on a fresh cache fetch the same file together: the second waits for the first instead of
    appending to its `.part`, and both end with the verified file."""
    from concurrent.futures import ThreadPoolExecutor

    base, state = served
    state.cut_once["/data.tar.gz"] = 1_000_000  # the first attempt is cut short: a .part exists mid-way
    dest = tmp_path / "cache" / "data.tar.gz"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: download(f"{base}/data.tar.gz", dest, sha256=SHA), range(2)))
    assert all(r.sha256 == SHA for r in results) and dest.read_bytes() == BLOB
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.tar.gz"]  # no part, no lock file left


def test_a_download_over_the_cap_is_refused_by_its_length_before_the_body_is_read(served, tmp_path: Path) -> None:
    base, _ = served
    dest = tmp_path / "cache" / "data.tar.gz"
    with pytest.raises(DownloadError) as err:
        download(f"{base}/data.tar.gz?X-Amz-Signature=s3cr3t", dest, limit=1_000_000)
    message = str(err.value)
    assert message == (f"{base}/data.tar.gz is {len(BLOB) / 1e6:.1f} MB (Content-Length), over the 1.0 MB download "
                       "cap (the cache's size, HEADBENCH_CACHE_LIMIT_GB); nothing was kept")
    assert not err.value.transient and list(dest.parent.iterdir()) == []


def test_a_response_without_a_length_is_cut_at_the_cap(served, tmp_path: Path) -> None:
    base, state = served
    state.no_length.add("/data.tar.gz")
    dest = tmp_path / "cache" / "data.tar.gz"
    written: list[int] = []
    with watching(lambda note: written.append(note.done)), pytest.raises(DownloadError) as err:
        download(f"{base}/data.tar.gz", dest, limit=1_000_000)
    assert "sent more than 1.0 MB without announcing a length, over the 1.0 MB download cap" in str(err.value)
    assert list(dest.parent.iterdir()) == []  # the partial file is gone
    assert max(written, default=0) <= 1_000_000  # never more than the cap on disk
    # within the cap, the same response is taken whole
    fetched = download(f"{base}/data.tar.gz", dest, sha256=SHA, limit=len(BLOB))
    assert fetched.path == dest and dest.read_bytes() == BLOB


def test_credentials_in_the_url_go_as_basic_auth_and_never_into_an_error_line(served, tmp_path: Path) -> None:
    import base64

    base, state = served
    host = base.removeprefix("http://")
    download(f"http://alice:p%40ss@{host}/data.tar.gz?token=abc", tmp_path / "a", sha256=SHA)
    assert state.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(b"alice:p@ss").decode()
    with pytest.raises(DownloadError) as err:
        download(f"http://alice:p%40ss@{host}/nope.tar.gz?X-Amz-Signature=s3cr3t", tmp_path / "b")
    assert str(err.value) == f"{base}/nope.tar.gz: HTTP 404 Not Found"
