"""prefect.yaml and flows/deploy.py describe the same deployments (names, entrypoints, pool, schedule)."""

from __future__ import annotations

import importlib

import pytest
import yaml
from prefect.flows import Flow

from flows.deploy import DEFAULT_CRON, DEFAULT_TIMEZONE, PROJECT_ROOT, SCHEDULED_DEFAULTS, TARGETS, cron_schedule
from flows.params import CompareParams, RetrainParams
from infra.errors import HeadbenchError
from infra.settings import Settings

CONFIG = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())


def test_prefect_yaml_matches_the_code() -> None:
    by_name = {d["name"]: d for d in CONFIG["deployments"]}
    assert set(by_name) == {t.name for t in TARGETS}
    for target in TARGETS:
        declared = by_name[target.name]
        assert declared["entrypoint"] == target.entrypoint
        assert declared["work_pool"]["name"] == Settings.model_fields["work_pool"].default
        path, _, attr = target.entrypoint.partition(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        assert isinstance(flow, Flow) and flow.name == target.flow_name
        assert bool(declared.get("schedules")) == target.scheduled
    [schedule] = by_name["scheduled"]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (DEFAULT_CRON, DEFAULT_TIMEZONE)
    RetrainParams(**by_name["scheduled"]["parameters"]["params"])  # the defaults it declares are valid
    assert by_name["scheduled"]["parameters"]["params"] == SCHEDULED_DEFAULTS  # and the ones `headbench deploy` sets
    CompareParams(**by_name["on-demand"].get("parameters", {}).get("params", {}))
    assert CONFIG["prefect-version"] == importlib.import_module("prefect").__version__


@pytest.mark.parametrize(("cron", "zone"), [("bad cron", "UTC"), ("0 3 * *", "UTC"), ("0 25 * * *", "UTC"),
                                           ("0 3 * * *", "Mars/Olympus")])
def test_invalid_schedule_is_one_line_naming_it(cron: str, zone: str) -> None:
    with pytest.raises(HeadbenchError) as info:
        cron_schedule(cron, zone)
    message = str(info.value)
    assert "\n" not in message and repr(cron) in message and repr(zone) in message


def test_valid_schedule() -> None:
    assert cron_schedule("30 2 * * 1-5", "Europe/Berlin").timezone == "Europe/Berlin"
