"""Data download task: dataset -> verified, cached arrays -> seeded stratified splits."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.datasets import DataSpec, PreparedData, load_raw, prepare
from infra.errors import retry_transient
from infra.s3 import s3_client
from infra.settings import Settings
from tasks import TIMEOUT_S


@task(name="download-data", timeout_seconds=TIMEOUT_S["download-data"],
      retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def download_data(spec: DataSpec, settings: Settings) -> PreparedData:
    """Fetch and verify the dataset (mirrored to the S3 data bucket), then subset, split and resize it."""
    client = s3_client(settings) if settings.s3_endpoint_url else None
    raw = load_raw(spec, settings.cache_dir, client, settings.data_bucket, settings.s3_endpoint_url)
    return prepare(raw, spec)
