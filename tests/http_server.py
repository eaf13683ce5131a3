"""A real HTTP file server on 127.0.0.1 for the download tests: the standard library's threaded server with a
handler that serves a folder with what dataset hosts send (Content-Length, ETag, Last-Modified, byte ranges,
304 on a matching conditional request), and can cut a transfer short once, as a dropped connection does."""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infra.processes.supervise import HOST


@dataclass
class ServerState:
    root: Path
    cut_once: dict[str, int] = field(default_factory=dict)  # URL path (no query) -> bytes sent before the drop
    ranges: bool = True  # honour Range requests (a server may not)
    no_length: set[str] = field(default_factory=set)  # URL paths sent without Content-Length, ended by closing
    requests: list[tuple[str, dict[str, str], int]] = field(default_factory=list)  # (path, headers, status)


def _handler(state: ServerState) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _record(self, status: int) -> None:
            state.requests.append((self.path, dict(self.headers.items()), status))

        def do_GET(self) -> None:
            path = (state.root / self.path.lstrip("/").split("?", 1)[0]).resolve()
            if not path.is_relative_to(state.root.resolve()) or not path.is_file():
                self._record(404)
                self.send_error(404)
                return
            data = path.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            modified = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
            if self.headers.get("If-None-Match") == etag or (
                    "If-None-Match" not in self.headers and self.headers.get("If-Modified-Since") == modified):
                self._record(304)
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            start, status = 0, 200
            wanted = self.headers.get("Range", "")
            if state.ranges and wanted.startswith("bytes=") and self.headers.get("If-Range", etag) in (etag, modified):
                start = int(wanted[6:].split("-", 1)[0])
                if start >= len(data):
                    self._record(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self._record(status)
            self.send_response(status)
            if self.path.split("?", 1)[0] in state.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
            self.send_header("Accept-Ranges", "bytes" if state.ranges else "none")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            cut = state.cut_once.pop(self.path.split("?", 1)[0], None)
            if cut is not None:  # a dropped connection: part of the body, then the socket closes
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serving(root: Path) -> Iterator[tuple[str, ServerState]]:
    """``(base URL, state)`` of a server for ``root`` on a free port, stopped when the block ends."""
    state = ServerState(root)
    server = http.server.ThreadingHTTPServer((HOST, 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
