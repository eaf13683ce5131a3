"""Alerts for scheduled retraining, built from Prefect's own events and automations.

The retrain flow emits one event per promotion outcome (``emit_outcome``): ``headbench.champion.promoted``
and ``headbench.challenger.rejected``, with the model, the versions and the scores as payload, so a user can
build any automation on them. `headbench deploy --notify URL` (or ``--notify-block`` naming any Prefect
notification block) creates three automations that send a notification through that block: a flow run of
the deployments that fails or crashes, a challenger that is rejected, a new champion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from infra.errors import HeadbenchError
from infra.uris import public_uri

PROMOTED = "headbench.champion.promoted"
REJECTED = "headbench.challenger.rejected"
WEBHOOK_BLOCK = "headbench-alerts"  # the Custom Webhook block `--notify URL` creates (or updates)


@dataclass(frozen=True)
class Alert:
    name: str
    events: frozenset[str]
    subject: str
    body: str  # Jinja, as Prefect renders an automation's action: `event`, `flow_run`, `deployment`


OUTCOME_BODY = ("{{ event.payload.model }} v{{ event.payload.version }}: {{ event.payload.metric }} "
                "{{ event.payload.challenger_score }} against champion v{{ event.payload.champion_version }} "
                "{{ event.payload.champion_score }}; {{ event.payload.reason }}. "
                "MLflow run: {{ event.payload.run_url }}")
ALERTS = (
    Alert("headbench: a scheduled run failed", frozenset({"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}),
          "headbench: {{ flow_run.name }} {{ flow_run.state.name }}",
          "Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment {{ deployment.name }} ended "
          "{{ flow_run.state.name }}: {{ flow_run.state.message }}"),
    Alert("headbench: challenger rejected", frozenset({REJECTED}),
          "headbench: {{ event.payload.model }} v{{ event.payload.version }} rejected", OUTCOME_BODY),
    Alert("headbench: new champion", frozenset({PROMOTED}),
          "headbench: {{ event.payload.model }} v{{ event.payload.version }} is the champion", OUTCOME_BODY),
)


def emit_outcome(model: str, version: str, outcome: str, payload: dict[str, Any]) -> None:
    """The promotion's outcome as a Prefect event of the model (related to this flow run and its deployment,
    which Prefect adds); outcomes other than promoted and rejected emit nothing."""
    from prefect.events import emit_event

    event = {"champion": PROMOTED, "challenger-rejected": REJECTED}.get(outcome)
    if event:
        emit_event(event=event, resource={"prefect.resource.id": f"headbench.model.{model}",
                                          "prefect.resource.name": model},
                   payload={"model": model, "version": version, "outcome": outcome, **payload})


def check_webhook_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HeadbenchError(f"--notify {public_uri(url)!r}: expected an http(s) URL of a webhook, e.g. "
                             "https://hooks.slack.com/services/...")


def notification_block(url: str | None, block: str | None) -> Any:
    """The block the automations notify through: a Custom Webhook block for ``url`` (saved as
    ``headbench-alerts``; the URL stays in Prefect's block store, never in a log), or the existing block
    ``block`` (``<type slug>/<name>``, as `prefect block ls` lists it). Returns its document id."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if url:
        check_webhook_url(url)
        webhook = CustomWebhookNotificationBlock(name=WEBHOOK_BLOCK, url=url,
                                                 json_data={"subject": "{{subject}}", "body": "{{body}}"})
        return webhook.save(WEBHOOK_BLOCK, overwrite=True)
    assert block
    try:
        loaded = Block.load(block)
    except (ValueError, KeyError) as exc:
        raise HeadbenchError(f"--notify-block {block!r}: no such Prefect block ({str(exc).splitlines()[0]}); "
                             "expected <type slug>/<name> as `prefect block ls` lists it") from None
    return loaded._block_document_id


def create_automations(block_id: Any, deployment_ids: list[str]) -> list[str]:
    """The three automations (replaced when they exist): failures of these deployments' flow runs, rejected
    challengers and new champions, each notifying through ``block_id``. Returns their names."""
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.exceptions import ObjectNotFound

    created = []
    for alert in ALERTS:
        try:
            Automation.read(name=alert.name).delete()
        except (ObjectNotFound, ValueError):
            pass
        if alert.events & {PROMOTED, REJECTED}:
            trigger = EventTrigger(expect=set(alert.events), match={"prefect.resource.id": "headbench.model.*"},
                                   for_each={"prefect.resource.id"}, posture="Reactive", threshold=1)
        else:
            trigger = EventTrigger(expect=set(alert.events), match={"prefect.resource.id": "prefect.flow-run.*"},
                                   match_related={"prefect.resource.role": "deployment", "prefect.resource.id":
                                                  [f"prefect.deployment.{d}" for d in deployment_ids]},
                                   for_each={"prefect.resource.id"}, posture="Reactive", threshold=1)
        Automation(name=alert.name, trigger=trigger,
                   actions=[SendNotification(block_document_id=block_id, subject=alert.subject,
                                             body=alert.body)]).create()
        created.append(alert.name)
    return created
