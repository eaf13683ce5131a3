"""S3 access through boto3 (any S3-compatible endpoint): client factory, error translation, model store.

A published model is a prefix ``s3://<bucket>/<name>/<run id>/`` holding ``model.safetensors`` and
``manifest.json``; the manifest (with the weights' sha256) is written last, so a prefix without a manifest
is an unfinished upload that readers ignore, and an existing manifest is never overwritten.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from infra.errors import HeadbenchError
from infra.settings import Settings
from models.weights import WEIGHTS_FILE, sha256_file

MANIFEST = "manifest.json"
CHAMPION = "champion.json"  # per model name: which published model the 'champion' alias points at
PROMOTION_LOCK = ".promotion.lock"
RUN_LEASES = ".run-leases"  # in the checkpoint bucket: <run id>.lease per run being trained
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "403"}  # HEAD requests carry no error body: just the status


class S3Error(HeadbenchError):
    """An S3 failure, in one line that names the endpoint (never the credentials)."""


class S3UnreachableError(S3Error):
    transient = True


def s3_client(settings: Settings, *, max_attempts: int = 4, connect_timeout: float = 3.0) -> Any:
    """A boto3 S3 client with bounded, standard-mode retries and path-style addressing."""
    if not settings.s3_endpoint_url:
        raise S3Error("no S3 endpoint configured: set AWS_ENDPOINT_URL_S3 or run `headbench up`")
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value() if settings.aws_access_key_id else None,
        aws_secret_access_key=(settings.aws_secret_access_key.get_secret_value()
                               if settings.aws_secret_access_key else None),
        region_name=settings.aws_region,
        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                      connect_timeout=connect_timeout, read_timeout=60, s3={"addressing_style": "path"}),
    )


def ray_storage(settings: Settings, prefix: str) -> tuple[str, Any]:
    """Ray's ``storage_path`` (``bucket/prefix``, no s3:// when a filesystem is given) and a pyarrow S3
    filesystem for it, for Ray Train checkpoints and Ray Tune experiment state.

    The filesystem carries the endpoint and region but no keys: Ray pickles it into its object store and
    GCS, so each process that unpickles it (driver, controller, every worker) takes the credentials from
    its own environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, the AWS SDK's default chain).
    The local stack starts its Ray nodes with them; a private Ray's workers inherit the driver's."""
    from urllib.parse import urlparse

    from pyarrow import fs

    endpoint = urlparse(settings.s3_endpoint_url or "")
    settings.export_env()  # this process's own chain: the variables, when they came from the env file
    # background_writes=False: with Arrow's default (True) a checkpoint upload queued every part of the
    # files in memory ahead of the network (+140-165 MB of USS in rank 0 for ResNet-18's 144 MB of weights
    # and optimizer state, kept afterwards by Arrow's mimalloc pool), on top of the training worker's own
    # peak; part by part it is +30 MB, and no slower against a local S3 (docs/performance.md)
    s3 = fs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "http",
                         region=settings.aws_region, background_writes=False)
    return f"{settings.checkpoint_bucket}/{prefix}", s3


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "?"))


@contextmanager
def s3_errors(endpoint: str | None, what: str) -> Iterator[None]:
    """Translate boto3 exceptions into a one-line S3Error naming the endpoint and the object."""
    try:
        yield
    except EndpointConnectionError:
        raise S3UnreachableError(f"S3 endpoint {endpoint} is unreachable while {what} (is it running? `headbench up`)"
                      ) from None
    except ClientError as exc:
        code = _code(exc)
        if code in _CREDENTIAL_CODES:
            raise S3Error(f"S3 at {endpoint} rejected the credentials ({code}) while {what}; check "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        if code == "NoSuchBucket" or (code == "404" and "bucket" in what):
            raise S3Error(f"S3 bucket missing at {endpoint} while {what} ({code}); create it or set "
                          "HEADBENCH_*_BUCKET") from None
        raise S3Error(f"S3 at {endpoint} failed while {what}: {code}") from None
    except BotoCoreError as exc:
        raise S3Error(f"S3 at {endpoint} failed while {what}: {exc}") from None


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise S3Error(f"not an S3 URI: {uri!r}; expected s3://bucket/prefix")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise S3Error(f"not an S3 URI: {uri!r}; expected s3://bucket/prefix")
    return bucket, key


def ensure_buckets(client: Any, buckets: list[str], endpoint: str | None) -> None:
    with s3_errors(endpoint, "creating buckets"):
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in buckets:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)


def object_exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return False
        raise


@dataclass(frozen=True)
class PublishedModel:
    uri: str  # s3://bucket/name/run_id/
    manifest: dict[str, Any]


class ModelStore:
    """Publish and fetch integrity-checked models under ``s3://<bucket>/<name>/<run id>/``."""

    def __init__(self, client: Any, bucket: str, endpoint: str | None) -> None:
        self.client, self.bucket, self.endpoint = client, bucket, endpoint

    def prefix_uri(self, name: str, run_id: str) -> str:
        return f"s3://{self.bucket}/{name}/{run_id}/"

    def publish(self, name: str, run_id: str, weights: Path, manifest: dict[str, Any]) -> PublishedModel:
        """Upload weights, verify them, then write the manifest (last). Idempotent for the same weights;
        refuses to overwrite different ones."""
        prefix = f"{name}/{run_id}/"
        digest = sha256_file(weights)
        manifest = {**manifest, "weights": WEIGHTS_FILE, "sha256": digest, "size": weights.stat().st_size}
        with s3_errors(self.endpoint, f"publishing s3://{self.bucket}/{prefix}"):
            if object_exists(self.client, self.bucket, prefix + MANIFEST):
                existing = json.loads(self.client.get_object(Bucket=self.bucket, Key=prefix + MANIFEST)["Body"].read())
                if existing.get("sha256") == digest:  # a retry of the same publication: already done
                    return PublishedModel(self.prefix_uri(name, run_id), existing)
                raise S3Error(f"refusing to overwrite the published model s3://{self.bucket}/{prefix}")
            self.client.upload_file(str(weights), self.bucket, prefix + WEIGHTS_FILE,
                                    ExtraArgs={"Metadata": {"sha256": digest}})
            head = self.client.head_object(Bucket=self.bucket, Key=prefix + WEIGHTS_FILE)
            if head["ContentLength"] != manifest["size"]:
                raise S3Error(f"upload of s3://{self.bucket}/{prefix}{WEIGHTS_FILE} is truncated "
                              f"({head['ContentLength']} of {manifest['size']} bytes)")
            try:  # create-only: of two racing publishers of one prefix, exactly one wins
                self.client.put_object(Bucket=self.bucket, Key=prefix + MANIFEST,
                                       Body=json.dumps(manifest, indent=2, sort_keys=True).encode(),
                                       ContentType="application/json", IfNoneMatch="*")
            except ClientError as exc:
                if _code(exc) in _PRECONDITION_CODES:
                    raise S3Error(f"refusing to overwrite the published model s3://{self.bucket}/{prefix}"
                                  ) from None
                raise
        return PublishedModel(self.prefix_uri(name, run_id), manifest)

    # ------------------------------------------------------------------ champion pointer
    def champion_key(self, name: str) -> str:
        return f"{name}/{CHAMPION}"

    def read_champion(self, name: str) -> dict[str, Any] | None:
        """The ``champion.json`` pointer of a model name, or None before the first promotion."""
        with s3_errors(self.endpoint, f"reading s3://{self.bucket}/{self.champion_key(name)}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.champion_key(name))["Body"].read()
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
        return json.loads(body)

    def write_champion(self, name: str, pointer: dict[str, Any]) -> None:
        with s3_errors(self.endpoint, f"writing s3://{self.bucket}/{self.champion_key(name)}"):
            self.client.put_object(Bucket=self.bucket, Key=self.champion_key(name),
                                   Body=json.dumps(pointer, indent=2, sort_keys=True).encode(),
                                   ContentType="application/json")

    def lease(self, name: str, owner: str, ttl_s: float = 120.0, wait_s: float = 120.0) -> S3Lease:
        """The promotion lock of a model name (see S3Lease)."""
        return S3Lease(self.client, self.bucket, f"{name}/{PROMOTION_LOCK}", owner, self.endpoint, ttl_s, wait_s)


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
            if _code(exc) in _PRECONDITION_CODES or _code(exc) in ("409", "ConditionalRequestConflict"):
                return False
            raise

    def _holder(self) -> tuple[dict[str, Any], str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
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
            if _code(exc) in _PRECONDITION_CODES or _code(exc) in ("409", "ConditionalRequestConflict"):
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
                    if _code(exc) not in _PRECONDITION_CODES | _MISSING_CODES:
                        raise


def run_lease(settings: Settings, run_id: str, owner: str) -> RunLease:
    return RunLease(s3_client(settings), settings.checkpoint_bucket, run_id, owner, settings.s3_endpoint_url)


def prune_checkpoints(client: Any, bucket: str, run_prefix: str, keep: int, endpoint: str | None) -> list[str]:
    """Delete all but the newest ``keep`` ``checkpoint_*`` folders under one Ray Train run's prefix
    (``ray/<run key>/``), newest by their objects' last write; Ray's own run state beside them stays.
    Returns the folders deleted."""
    prefix = run_prefix.rstrip("/") + "/"
    folders: dict[str, list[str]] = {}
    written: dict[str, Any] = {}
    with s3_errors(endpoint, f"listing s3://{bucket}/{prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                folder = obj["Key"][len(prefix):].split("/", 1)[0]
                if folder.startswith("checkpoint_") and "/" in obj["Key"][len(prefix):]:
                    folders.setdefault(folder, []).append(obj["Key"])
                    written[folder] = max(written.get(folder, obj["LastModified"]), obj["LastModified"])
    doomed = sorted(folders, key=lambda f: (written[f], f))[:max(0, len(folders) - keep)]
    keys = [{"Key": key} for folder in doomed for key in folders[folder]]
    with s3_errors(endpoint, f"pruning checkpoints under s3://{bucket}/{prefix}"):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys a call
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})
    return doomed


def fetch_model(client: Any, uri: str, dest: Path, endpoint: str | None) -> tuple[Path, dict[str, Any]]:
    """Download a published model (prefix or manifest URI) into ``dest`` and verify its sha256."""
    bucket, key = split_uri(uri)
    prefix = key.removesuffix(MANIFEST).removesuffix(WEIGHTS_FILE)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    dest.mkdir(parents=True, exist_ok=True)
    with s3_errors(endpoint, f"fetching {uri}"):
        try:
            body = client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise S3Error(f"no published model at s3://{bucket}/{prefix} (no {MANIFEST})") from None
            raise
        manifest = json.loads(body)
        weights = dest / WEIGHTS_FILE
        client.download_file(bucket, prefix + manifest.get("weights", WEIGHTS_FILE), str(weights))
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        weights.unlink(missing_ok=True)
        raise S3Error(f"sha256 mismatch for s3://{bucket}/{prefix}{WEIGHTS_FILE}: got {digest[:12]}..., "
                      f"manifest says {str(manifest.get('sha256'))[:12]}...")
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return weights, manifest
