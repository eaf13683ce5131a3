"""Ray Train's checkpoints in S3: the storage Ray writes them to, and pruning a finished run's to the newest."""

from __future__ import annotations

from typing import Any

from infra.settings import Settings
from infra.storage.s3 import s3_errors


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
