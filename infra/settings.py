"""The one settings object. Built once at the edge (CLI, flow entry) and passed down.

Endpoints and credentials come from each tool's standard variables (``MLFLOW_TRACKING_URI``,
``AWS_ENDPOINT_URL_S3``, ``PREFECT_API_URL``, ``RAY_ADDRESS``...). When a variable is unset, the local
stack's env file (``$HEADBENCH_HOME/env``, written by ``headbench up``) fills it in. headbench's own knobs
use the ``HEADBENCH_`` prefix.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".headbench")
# Every variable ``standard_env`` may export: what a process clears before it points itself at one stack
STANDARD_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                      "AWS_DEFAULT_REGION", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RAY_ADDRESS",
                      "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "HEADBENCH_RAY_TEMP_DIR")


class StackPorts(BaseSettings):
    """Ports of the local stack (all bound to 127.0.0.1). Every SeaweedFS port is set explicitly so two
    stacks on one machine never collide."""

    model_config = SettingsConfigDict(env_prefix="HEADBENCH_PORT_", extra="ignore")

    s3: int = 8333
    s3_grpc: int = 18333
    mlflow: int = 5000
    prefect: int = 4200
    prefect_worker: int = 4201  # the worker's health endpoint
    weed_master: int = 9333
    weed_master_grpc: int = 19333
    weed_volume: int = 8080
    weed_volume_grpc: int = 18080
    weed_filer: int = 8888
    weed_filer_grpc: int = 18888
    weed_admin: int = 23646
    weed_admin_grpc: int = 33646
    ray_gcs: int = 6390  # `up --ray-nodes N`: the head's GCS, what RAY_ADDRESS holds (Ray's 6379 is Redis's)
    ray_dashboard: int = 8265
    postgres: int = 15432  # `up --backend postgres` without --database-url: the stack's own server

    def all(self) -> dict[str, int]:
        return self.model_dump()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    home: Path = Field(DEFAULT_HOME, validation_alias="HEADBENCH_HOME",
                       description="state directory of the local stack: data, logs, pid files, env file")

    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    mlflow_tracking_username: str | None = Field(None, validation_alias="MLFLOW_TRACKING_USERNAME")
    mlflow_tracking_password: SecretStr | None = Field(
        None, validation_alias="MLFLOW_TRACKING_PASSWORD",
        description="the MLflow server's login (`headbench up` generates the admin password per stack)")
    mlflow_s3_endpoint_url: str | None = Field(None, validation_alias="MLFLOW_S3_ENDPOINT_URL")
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    aws_access_key_id: SecretStr | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    prefect_api_url: str | None = Field(None, validation_alias="PREFECT_API_URL")
    prefect_api_auth_string: SecretStr | None = Field(
        None, validation_alias="PREFECT_API_AUTH_STRING",
        description="the Prefect server's basic-auth string (`headbench up` generates one per stack)")
    ray_address: str | None = Field(None, validation_alias="RAY_ADDRESS")
    ray_auth_mode: str | None = Field(None, validation_alias="RAY_AUTH_MODE")
    ray_auth_token: SecretStr | None = Field(
        None, validation_alias="RAY_AUTH_TOKEN",
        description="Ray's token (RAY_AUTH_MODE=token): the stack's cluster and every private per-run Ray use it")
    ray_temp_dir: Path | None = Field(None, validation_alias="HEADBENCH_RAY_TEMP_DIR",
                                      description="with RAY_ADDRESS: attach to the node on this host started with "
                                      "this --temp-dir (the stack's 0-CPU driver node) when several share it")
    ray_logs: bool = Field(False, validation_alias="HEADBENCH_RAY_LOGS",
                           description="forward Ray's worker and actor output to the driver (`--verbose`); off, "
                           "progress comes from MLflow and the logs stay in MLflow, Prefect and Ray's log files")
    ray_prestart: bool = Field(True, validation_alias="HEADBENCH_RAY_PRESTART",
                               description="start Ray Train's worker processes, and their imports, while the run "
                               "sets up (a cluster whose CPUs are on one node; docs/performance.md)")

    database_url: SecretStr | None = Field(None, validation_alias="HEADBENCH_DATABASE_URL",
                                           description="`up --backend postgres`: postgresql://user[:password]@host"
                                           ":5432/name[?sslmode=...], when not given as --database-url")

    model_bucket: str = Field("models", validation_alias="HEADBENCH_MODEL_BUCKET")
    data_bucket: str = Field("data", validation_alias="HEADBENCH_DATA_BUCKET")
    checkpoint_bucket: str = Field("checkpoints", validation_alias="HEADBENCH_CHECKPOINT_BUCKET")
    mlflow_bucket: str = Field("mlflow", validation_alias="HEADBENCH_MLFLOW_BUCKET")
    keep_checkpoints: int = Field(1, ge=0, validation_alias="HEADBENCH_KEEP_CHECKPOINTS",
                                  description="Ray Train checkpoints kept in S3 per run once its model is "
                                  "published (0: none); during training Ray keeps the last 2")
    experiment: str = Field("headbench", validation_alias="HEADBENCH_EXPERIMENT")
    work_pool: str = Field("headbench", validation_alias="HEADBENCH_WORK_POOL",
                           description="Prefect process work pool the deployments use and the local worker polls")
    worker_query_seconds: float = Field(
        5.0, ge=1, le=600, validation_alias="PREFECT_WORKER_QUERY_SECONDS",
        description="how often the stack's Prefect worker asks for runs to start (a run triggered from the "
        "dashboard starts within this long); each poll costs the Prefect server CPU beside training")
    data_cache: Path | None = Field(None, validation_alias="HEADBENCH_DATA_CACHE",
                                    description="local dataset cache (default: $HEADBENCH_HOME/cache)")
    dataset_mirror: str | None = Field(None, validation_alias="HEADBENCH_DATASET_MIRROR",
                                       description="base URL that replaces the upstream hosts of named datasets: "
                                       "their files are fetched from <mirror>/<dataset>/<file> (an offline site's "
                                       "own copy)")
    archive_member_limit_mb: float = Field(2048.0, gt=0, validation_alias="HEADBENCH_ARCHIVE_MEMBER_LIMIT_MB",
                                           description="largest file a dataset archive may hold, MB (a larger "
                                           "member is refused by name)")
    cache_limit_gb: float = Field(20.0, ge=0, validation_alias="HEADBENCH_CACHE_LIMIT_GB",
                                  description="size cap of the cache's ImageFolder mirrors and weight copies, "
                                  "least recently used removed first after each download (`headbench gc`)")

    @cached_property
    def ports(self) -> StackPorts:
        return StackPorts()

    @property
    def env_file(self) -> Path:
        return self.home / "env"

    @property
    def cache_dir(self) -> Path:
        return self.data_cache or self.home / "cache"

    def standard_env(self) -> dict[str, str]:
        """The standard variables this settings object resolved, for child processes and libraries."""
        values = {
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_tracking_username,
            "MLFLOW_TRACKING_PASSWORD": (self.mlflow_tracking_password.get_secret_value()
                                         if self.mlflow_tracking_password else None),
            "MLFLOW_S3_ENDPOINT_URL": self.mlflow_s3_endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id.get_secret_value() if self.aws_access_key_id else None,
            "AWS_SECRET_ACCESS_KEY": (self.aws_secret_access_key.get_secret_value()
                                      if self.aws_secret_access_key else None),
            "AWS_DEFAULT_REGION": self.aws_region,
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_AUTH_STRING": (self.prefect_api_auth_string.get_secret_value()
                                        if self.prefect_api_auth_string else None),
            "RAY_ADDRESS": self.ray_address,
            "RAY_AUTH_MODE": self.ray_auth_mode,
            "RAY_AUTH_TOKEN": self.ray_auth_token.get_secret_value() if self.ray_auth_token else None,
            "HEADBENCH_RAY_TEMP_DIR": str(self.ray_temp_dir) if self.ray_temp_dir else None,
        }
        return {k: v for k, v in values.items() if v}

    def export_env(self) -> None:
        """Fill unset standard variables in os.environ (libraries such as Prefect and boto3 read them)."""
        for key, value in self.standard_env().items():
            os.environ.setdefault(key, value)


def load_settings(home: Path | None = None) -> Settings:
    """Environment first; the local stack's env file fills what the environment leaves unset."""
    home = home or Path(os.environ.get("HEADBENCH_HOME", DEFAULT_HOME))
    env_file = home / "env"
    kwargs: dict[str, object] = {"home": home}
    if env_file.is_file():
        kwargs["_env_file"] = env_file
    try:
        return Settings(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:  # a bad environment variable: its name, value and what it must be, on one line
        from infra.errors import HeadbenchError

        e = exc.errors()[0]
        name = ".".join(str(part) for part in e["loc"])
        raise HeadbenchError(f"{name}={str(e.get('input'))[:80]!r}: {e['msg']}") from None


def require_servers(settings: Settings) -> tuple[str, str]:
    """(tracking URI, S3 endpoint), or one line saying how to configure them when either is missing."""
    from infra.errors import HeadbenchError

    if not settings.mlflow_tracking_uri:
        raise HeadbenchError("MLFLOW_TRACKING_URI is not set and no local stack env file was found; "
                             "run `headbench up` or export MLFLOW_TRACKING_URI")
    if not settings.s3_endpoint_url:
        raise HeadbenchError("AWS_ENDPOINT_URL_S3 is not set and no local stack env file was found; "
                             "run `headbench up` or export AWS_ENDPOINT_URL_S3")
    return settings.mlflow_tracking_uri, settings.s3_endpoint_url
