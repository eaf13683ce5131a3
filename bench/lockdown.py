"""`python -m bench lockdown`: how long each refusal of docs/reliability.md's *Attacks tried* takes, and what a
login costs a request. Hostile archives and downloads are refused in this process (no servers); the services'
refusals are timed against a private stack on free ports (or the one at --home), as a caller without the
stack's credentials makes them. Each figure is the median of ``repeats`` tries, in milliseconds."""

from __future__ import annotations

import io
import stat
import statistics
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.uris import basic_auth

MB = 1_000_000


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _refused(fn: Callable[[], object], expected: type[BaseException]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except expected:
            return
        raise AssertionError(f"{fn} was not refused")
    return call


def _chain_archives(folder: Path) -> tuple[Path, Path]:
    """The symlink chain (`b -> p/q`, `a -> b/../..`, `p -> .`, then `a/X`) as a zip and as a tar."""
    zipped, tarred = folder / "chain.zip", folder / "chain.tar"
    with zipfile.ZipFile(zipped, "w") as zf, tarfile.open(tarred, "w") as tar:
        for name, target in (("b", "p/q"), ("a", "b/../.."), ("p", ".")):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        zf.writestr("a/X", b"escaped")
        member = tarfile.TarInfo("a/X")
        member.size = 7
        tar.addfile(member, io.BytesIO(b"escaped"))
    return zipped, tarred


def local_refusals(repeats: int) -> dict[str, float]:
    """Archives and downloads, refused with no server but a loopback HTTP server of the standard library."""
    import http.server
    import threading

    from infra.data.archives import ArchiveError, extract
    from infra.data.download import DownloadError, download

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        zipped, tarred = _chain_archives(folder)
        for label, archive in (("symlink chain as zip", zipped), ("symlink chain as tar", tarred)):
            out[label] = _median_ms(_refused(lambda a=archive: extract(a, folder / "out", member_limit=MB,
                                                                       total_limit=10 * MB), ArchiveError), repeats)
        body = b"\0" * (3 * MB)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                if "length" in self.path:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except ConnectionError:  # the client stopped reading at its cap: what is measured
                    pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for label, path in (("download announcing 3 MB over a 1 MB cap", "/length.tar.gz"),
                                ("download without a length, cut at a 1 MB cap", "/stream.tar.gz")):
                out[label] = _median_ms(_refused(lambda p=path: download(base + p, folder / "d" / "x.tar.gz",
                                                                         limit=MB), DownloadError), repeats)
        finally:
            server.shutdown()
            server.server_close()
    return out


def service_refusals(settings: Any, stack: Any, repeats: int) -> dict[str, float]:
    """Each service asked without the stack's credentials (and MLflow with them, to price the login)."""
    import boto3
    import httpx
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = httpx.Client(timeout=30)  # one connection pool, as a client keeps: the server's time is measured

    def status(method: str, url: str, want: int, **kwargs: Any) -> Callable[[], None]:
        def call() -> None:
            got = client.request(method, url, **kwargs).status_code
            assert got == want, (url, got)
        return call

    mlflow, p = stack.mlflow_url, stack.ports
    login = basic_auth(f"admin:{stack.mlflow_password}")
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    out = {
        "MLflow REST without the login (401)": _median_ms(status("GET", search, 401), repeats),
        "MLflow REST with the login (200, login cached)": _median_ms(status("GET", search, 200, headers=login),
                                                                     repeats),
        "MLflow health probe, no login needed (200)": _median_ms(status("GET", f"{mlflow}/health", 200), repeats),
        "Prefect API without the auth string (401)": _median_ms(
            status("GET", f"{stack.prefect_url}/api/work_pools/{settings.work_pool}", 401), repeats),
        "SeaweedFS filer HTTP PUT (404: API off)": _median_ms(
            status("PUT", f"http://127.0.0.1:{p.weed_filer}/buckets/models/x", 404, content=b"x"), repeats),
        "SeaweedFS master /col/delete (404: API off)": _median_ms(
            status("GET", f"http://127.0.0.1:{p.weed_master}/col/delete?collection=models", 404), repeats),
        "SeaweedFS volume GET without a JWT (401)": _median_ms(
            status("GET", f"http://127.0.0.1:{p.weed_volume}/1,0123456789", 401), repeats),
    }
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id=stack.access_key,
                      aws_secret_access_key="not-the-secret", region_name="us-east-1",  # noqa: S106 - wrong on purpose
                      config=Config(retries={"max_attempts": 1}))
    out["S3 with a wrong secret (403)"] = _median_ms(
        _refused(lambda: s3.list_objects_v2(Bucket=settings.model_bucket), ClientError), repeats)
    return out


def ray_refusals(settings: Any, repeats: int) -> dict[str, float]:
    """A private Ray's dashboard (as every run without a cluster starts one), asked without its token."""
    import httpx

    from infra.training.cluster import init_ray

    dashboard = init_ray(settings.model_copy(update={"ray_address": None}))
    import ray

    try:
        with httpx.Client(timeout=30) as client:
            def jobs() -> None:
                assert client.get(f"{dashboard}/api/jobs/").status_code == 401
            return {"Ray dashboard job API without the token (401)": _median_ms(jobs, repeats)}
    finally:
        ray.shutdown()


def main(repeats: int, home: Path | None) -> int:
    from bench.run import local_stack
    from infra.stack.local import LocalStack

    rows = local_refusals(repeats)
    with local_stack(home) as settings:
        rows |= service_refusals(settings, LocalStack(settings), repeats)
        rows |= ray_refusals(settings, repeats)
    print(f"| refusal (median of {repeats}) | ms |\n|---|---|")
    for label, ms in rows.items():
        print(f"| {label} | {ms:.1f} |")
    return 0
