"""Data download task: dataset -> verified, cached arrays -> seeded stratified splits."""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from infra.data.cache import collect, human
from infra.data.download import every, watching
from infra.data.load import load_raw
from infra.data.spec import DataSpec, PreparedData, Sources, prepare
from infra.errors import retry_transient
from infra.settings import Settings
from infra.storage.s3 import s3_client
from tasks import TIMEOUT_S


@task(name="download-data", timeout_seconds=TIMEOUT_S["download-data"],
      retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def download_data(spec: DataSpec, settings: Settings) -> PreparedData:
    """Fetch and verify the dataset (mirrored to the S3 data bucket), then subset, split and resize it."""
    client = s3_client(settings) if settings.s3_endpoint_url else None
    with watching(every(5.0, _logger().info)):  # downloads: a progress line every 5 s in the task's log
        raw = load_raw(spec, settings.cache_dir, Sources.from_settings(settings, client))
    trim_cache(settings)
    return prepare(raw, spec)


def trim_cache(settings: Settings) -> None:
    """Keep the cache within ``HEADBENCH_CACHE_LIMIT_GB`` once something new is in it (entries in use stay)."""
    removed, left = collect(settings.cache_dir, int(settings.cache_limit_gb * 1e9))
    log = _logger()
    for entry in removed:
        log.info("cache over %.1f GB: removed %s (%s, least recently used)", settings.cache_limit_gb,
                              entry.path, human(entry.size))
    if removed:
        log.info("cache now %s", human(left))


def _logger() -> logging.Logger | logging.LoggerAdapter:  # type: ignore[type-arg]
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (e.g. `headbench predict`)
        return logging.getLogger("headbench.cache")
