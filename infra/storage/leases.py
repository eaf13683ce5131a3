"""Mutual exclusion in S3: a lease held as one object, taken with a create-only conditional PUT. The promotion
lock of a model name (``infra.publishing.store``) and the run lease that keeps one trainer per MLflow run
(``RunLease``, in the checkpoint bucket) are such leases."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from infra.errors import HeadbenchError
from infra.settings import Settings
from infra.storage.s3 import MISSING_CODES, PRECONDITION_CODES, S3Error, error_code, s3_client, s3_errors

RUN_LEASES = ".run-leases"  # in the checkpoint bucket: <run id>.lease per run being trained


class S3Lease:
    """A mutual-exclusion lease held as one S3 object, taken with a create-only conditional PUT
    (``If-None-Match: *``: of N racing writers exactly one gets 200, the rest 412).

    A lease older than ``ttl_s`` (its holder died) is taken over with ``If-Match: <its ETag>``, so two
    rescuers cannot both win. Needs an S3 with conditional writes (AWS S3, MinIO, SeaweedFS >= 3.97).
    """

    def __init__(self, client: Any, bucket: str, key: str, owner: str, endpoint: str | None,
                 ttl_s: float = 120.0, wait_s: float = 120.0) -> None:
        self.client, self.bucket, self.key, self.owner, self.endpoint = client, bucket, key, owner, endpoint
        self.ttl_s, self.wait_s = ttl_s, wait_s

    def _put(self, **condition: str) -> bool:
        body = json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s}).encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
            return True
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_CODES or error_code(exc) in ("409", "ConditionalRequestConflict"):
                return False
            raise

    def _holder(self) -> tuple[dict[str, Any], str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise
        return json.loads(obj["Body"].read()), obj["ETag"]

    def acquire(self) -> None:
        where = f"s3://{self.bucket}/{self.key}"
        deadline = time.monotonic() + self.wait_s
        with s3_errors(self.endpoint, f"taking the lease {where}"):
            while True:
                if self._put(IfNoneMatch="*"):
                    return
                holder = self._holder()
                if holder is not None and holder[0].get("expires_at", 0) < time.time() and self._put(
                        IfMatch=holder[1]):
                    return  # the previous holder died without releasing
                if time.monotonic() > deadline:
                    owner = holder[0].get("owner") if holder else "?"
                    raise S3Error(f"lease {where} still held by {owner} after {self.wait_s:.0f} s")
                time.sleep(0.2 + random.random() * 0.3)

    def release(self) -> None:
        with s3_errors(self.endpoint, f"releasing the lease s3://{self.bucket}/{self.key}"):
            holder = self._holder()
            if holder is not None and holder[0].get("owner") == self.owner:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)

    def __enter__(self) -> S3Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunBusyError(HeadbenchError):
    """Another process is training (or resuming) this run: a second one is refused, not queued."""


class RunLease(S3Lease):
    """The lease of one MLflow run id, held from the moment a retrain opens the run until it has published:
    a second resume of the same run is refused at once instead of racing the first to the same S3 prefix.

    The holder renews it every ``ttl_s / 3`` from a daemon thread (If-Match on its own ETag), so a live
    run never expires however long it trains; a holder that died stops renewing and is taken over after
    ``ttl_s``, or at once when it was a process of this host that no longer exists (a crashed driver
    resumed on the same machine). ``check()`` before publishing: a lease taken over meanwhile means
    another process owns the run now, and this one must not write its model.
    """

    def __init__(self, client: Any, bucket: str, run_id: str, owner: str, endpoint: str | None,
                 ttl_s: float = 45.0) -> None:
        super().__init__(client, bucket, f"{RUN_LEASES}/{run_id}.lease", owner, endpoint, ttl_s, wait_s=0.0)
        self.run_id = run_id
        self._etag: str | None = None
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl_s}).encode()

    def _put(self, **condition: str) -> bool:
        try:
            self._etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                **condition)["ETag"]
            return True
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_CODES or error_code(exc) in ("409", "ConditionalRequestConflict"):
                return False
            raise

    @staticmethod
    def _dead_here(holder: dict[str, Any]) -> bool:
        import psutil

        return holder.get("host") == socket.gethostname() and not psutil.pid_exists(int(holder.get("pid", 0)))

    def acquire(self) -> None:
        where = f"s3://{self.bucket}/{self.key}"
        with s3_errors(self.endpoint, f"taking the run lease {where}"):
            if not self._put(IfNoneMatch="*"):
                held = self._holder()
                if held is None:  # released between our PUT and GET
                    taken = self._put(IfNoneMatch="*")
                else:
                    info, etag = held
                    expired = info.get("expires_at", 0) < time.time() or self._dead_here(info)
                    taken = expired and self._put(IfMatch=etag)
                if not taken:
                    info = held[0] if held else {}
                    left = max(0.0, float(info.get("expires_at", 0)) - time.time())
                    raise RunBusyError(
                        f"MLflow run {self.run_id} is already being trained by {info.get('owner', '?')} "
                        f"(pid {info.get('pid', '?')} on {info.get('host', '?')}); one process per run: wait "
                        f"for it to end, or, if it died on another machine, retry in {left:.0f} s")
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run_id[:8]}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._put(IfMatch=self._etag or "*"):
                    self._lost = True  # someone took it over (we stalled past the TTL): stop claiming it
                    return
            except (ClientError, BotoCoreError):
                continue  # S3 briefly away: try again next period; the TTL covers a few misses

    def check(self) -> None:
        """Raise unless this process still holds the lease (call before writing anything for the run)."""
        if self._lost:
            raise RunBusyError(f"lost the lease of MLflow run {self.run_id} to another process (this one "
                               f"stalled for over {self.ttl_s:.0f} s); not publishing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self._lost and self._etag:
            with s3_errors(self.endpoint, f"releasing the run lease s3://{self.bucket}/{self.key}"):
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
                except ClientError as exc:
                    if error_code(exc) not in PRECONDITION_CODES | MISSING_CODES:
                        raise


def run_lease(settings: Settings, run_id: str, owner: str) -> RunLease:
    return RunLease(s3_client(settings), settings.checkpoint_bucket, run_id, owner, settings.s3_endpoint_url)
