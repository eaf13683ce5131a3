"""The S3 model store. A published model is a prefix ``s3://<bucket>/<name>/<run id>/`` holding
``model.safetensors`` and ``manifest.json``; the manifest (with the weights' sha256) is written last, so a
prefix without a manifest is an unfinished upload that readers ignore, and an existing manifest is never
overwritten. ``champion.json`` per model name points at the champion; promotions hold the name's lease."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.storage.leases import S3Lease
from infra.storage.s3 import MISSING_CODES, PRECONDITION_CODES, S3Error, error_code, object_exists, s3_errors, split_uri
from models.weights import WEIGHTS_FILE, sha256_file

MANIFEST = "manifest.json"
CHAMPION = "champion.json"  # per model name: which published model the 'champion' alias points at
PROMOTION_LOCK = ".promotion.lock"


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
                if error_code(exc) in PRECONDITION_CODES:
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
                if error_code(exc) in MISSING_CODES:
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
