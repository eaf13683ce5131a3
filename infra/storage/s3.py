"""S3 through boto3 (any S3-compatible endpoint): the client, one-line errors naming the endpoint and the
object (never the credentials), ``s3://`` URIs, buckets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from infra.errors import HeadbenchError
from infra.settings import Settings

PRECONDITION_CODES = {"PreconditionFailed", "412"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
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


def error_code(exc: ClientError) -> str:
    """S3's error code of a boto3 ClientError ('NoSuchKey', '412'...)."""
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
        code = error_code(exc)
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
        if error_code(exc) in MISSING_CODES:
            return False
        raise
