"""Deployments: `retrain/scheduled` (cron) and `compare-heads/on-demand` on a Prefect `process` work pool.

The flow code is deployed *from this project directory* (``flow.from_source`` with a local path: the pull
step is ``set_working_directory``), so no image, registry or git remote is involved; a worker on this
machine (``headbench up`` starts one) runs each flow run as a subprocess. ``prefect.yaml`` at the project
root declares the same two deployments for users of ``prefect deploy``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.params import CompareParams, RetrainParams
from infra.errors import HeadbenchError
from infra.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRON = "0 3 * * *"  # nightly at 03:00
DEFAULT_TIMEZONE = "UTC"
TAGS = ["headbench"]


@dataclass(frozen=True)
class DeploymentTarget:
    """One deployment: which flow (entrypoint relative to the project root) under which name."""

    flow_name: str
    name: str
    entrypoint: str
    description: str
    scheduled: bool

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


RETRAIN = DeploymentTarget("retrain", "scheduled", "flows/retrain.py:retrain",
                           "Scheduled retraining: fine-tune, evaluate, publish, promote to champion if better.",
                           scheduled=True)
COMPARE = DeploymentTarget("compare-heads", "on-demand", "flows/compare.py:compare_heads",
                           "Compare head strategies x seeds on one split (trigger from the dashboard).",
                           scheduled=False)
TARGETS = (RETRAIN, COMPARE)
# What the scheduled deployment changes from the `run` defaults: start from the champion, and train only
# when the data or a training parameter changed since it (prefect.yaml says the same)
SCHEDULED_DEFAULTS: dict[str, object] = {"warm_start": "champion", "skip_if_unchanged": True}


@dataclass(frozen=True)
class Deployed:
    target: DeploymentTarget
    id: str
    url: str


def cron_schedule(cron: str, timezone: str) -> Any:
    """A validated Prefect cron schedule; a bad expression or zone is a one-line error naming it."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise HeadbenchError(f"invalid schedule --cron {cron!r} --timezone {timezone!r}: {reason}; expected five "
                             "cron fields like '0 3 * * *' and an IANA zone like 'Europe/Berlin'") from None


def ensure_work_pool(name: str) -> None:
    """Create the process work pool when missing (the worker also does; deploy must not depend on order)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass
            return
    if pool.type != "process":
        raise HeadbenchError(f"work pool {name!r} exists with type {pool.type!r}; headbench deploys to a "
                             "'process' pool: set HEADBENCH_WORK_POOL to another name")


def deploy_all(settings: Settings, *, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE,
               retrain_params: RetrainParams | None = None, compare_params: CompareParams | None = None,
               paused: bool = False) -> list[Deployed]:
    """Create or update both deployments on the Prefect server at PREFECT_API_URL."""
    from prefect import flow as prefect_flow

    schedule = cron_schedule(cron, timezone)
    ui = (settings.prefect_api_url or "").removesuffix("/").removesuffix("/api")
    ensure_work_pool(settings.work_pool)
    defaults = {RETRAIN: retrain_params or RetrainParams(**SCHEDULED_DEFAULTS),  # type: ignore[arg-type]
                COMPARE: compare_params or CompareParams()}
    deployed = []
    for target in TARGETS:
        loaded = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint=target.entrypoint)
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints its own table; the CLI prints ours
            deployment_id = loaded.deploy(
                target.name, work_pool_name=settings.work_pool, build=False, push=False, print_next_steps=False,
                schedules=[schedule] if target.scheduled else [], paused=paused,
                parameters={"params": defaults[target].model_dump(mode="json")},
                description=target.description, tags=TAGS, enforce_parameter_schema=True)
        deployed.append(Deployed(target, str(deployment_id), f"{ui}/deployments/deployment/{deployment_id}"))
    return deployed
