"""The `retrain` flow: download -> build head -> Ray Train fine-tune -> evaluate -> publish.

Read top-down like a recipe. Parameters are one typed pydantic model, so the Prefect UI renders a form
with help text and the server rejects bad values before anything runs.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel

from flows.alerts import emit_outcome
from flows.params import RetrainParams
from flows.stages import cancel_on_interrupt, stage
from infra.settings import Settings, load_settings, require_servers
from infra.storage.leases import RunLease, run_lease
from infra.tracking.lineage import lineage, log_datasets
from infra.tracking.runs import (
    CHAMPION_ALIAS,
    Tracker,
    alias_version,
    describe_version,
    flatten,
    reopen_run,
    run_url,
    start_run,
)
from infra.uris import public_name, public_uri
from models import parse_strategy
from models.schedules import describe_plan, phase_params
from tasks import FLOW_TIMEOUT_S
from tasks.build import build_head_model
from tasks.data import download_data
from tasks.evaluate import evaluate_model, log_learning_curves
from tasks.freshness import DATA_DIGEST_PARAM, Freshness, check_unchanged
from tasks.promote import Decision, PromotionPolicy, promote_model
from tasks.publish import build_manifest, prune_run_checkpoints, publish_model
from tasks.train import train_model

SKIPPED = "skipped"


class RetrainResult(BaseModel):
    run_id: str  # of this run's MLflow run; for a skipped run, the champion's
    run_url: str
    s3_uri: str
    model_uri: str = ""  # the MLflow logged model (models:/<model id>), the registry version's source
    registered_model: str
    version: str
    test_accuracy: float
    test_macro_f1: float
    test_metrics: dict[str, float] = {}  # every test metric and the inference speed (empty when skipped)
    history: list[dict[str, float]]
    promotion: str  # champion | challenger-rejected | not-promoted | skipped
    promotion_reason: str
    champion_version: str | None  # the alias target after this run
    freshness: str = ""  # skip_if_unchanged: what changed since the champion (or why nothing was skipped)

    @property
    def skipped(self) -> bool:
        return self.promotion == SKIPPED


def run_params() -> tuple[dict[str, Any], str]:
    """This flow run's parameters as a dict, and the dataset's short name, for run names."""
    raw = flow_run.get_parameters().get("params") or {}
    p = raw if isinstance(raw, dict) else raw.model_dump()
    return p, public_name(str(p.get("dataset", "fashion-mnist")))


def _flow_run_name() -> str:
    """The model and when the run was due, e.g. ``headbench-classifier-2026-12-06T0300`` (UTC): every scheduled
    run of one model gets its own name, in Prefect and in MLflow (the MLflow run takes the flow run's name)."""
    p, _ = run_params()
    due = flow_run.get_scheduled_start_time() or dt.datetime.now(dt.UTC)
    return f"{p.get('model_name', 'headbench-classifier')}-{due.astimezone(dt.UTC):%Y-%m-%dT%H%M}"


def prefect_context() -> dict[str, str]:
    """Where this flow run lives in Prefect, as MLflow tags: id, UI URL, deployment, scheduled or not."""
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    deployment_name = ""
    if run is not None and run.deployment_id is not None:
        deployment_name = f"{flow_run.get_flow_name()}/{deployment.get_name()}"
    return {"prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or "",
            "prefect.flow_run_url": flow_run.get_flow_run_ui_url() or "", "prefect.deployment": deployment_name,
            "prefect.scheduled": str(bool(run and run.auto_scheduled)).lower()}


def resolve_warm_start(params: RetrainParams, tracking_uri: str) -> tuple[str, str | None]:
    """``warm_start=champion`` -> the champion's registry URI (and version); otherwise ``params.weights``."""
    if params.warm_start == "champion":
        champion = alias_version(tracking_uri, params.model_name, CHAMPION_ALIAS)
        if champion is not None:
            return f"models:/{params.model_name}/{champion.version}", champion.version
        print(f"warm start: {params.model_name!r} has no champion yet; starting from weights={params.weights!r}")
    return params.weights, None


def summary_markdown(params: RetrainParams, metrics: dict[str, float], decision: Decision, run_link: str,
                     s3_uri: str, model_uri: str = "") -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    champion = (f"v{decision.champion_version} scored {decision.champion_score:.4f} on this test split"
                if decision.champion_score is not None else "none compared")
    dataset = public_uri(params.dataset)
    return (f"# retrain `{params.model_name}` v{decision.challenger_version}\n\n"
            f"{params.arch} · strategy `{params.strategy}` · {params.epochs} epochs · dataset {dataset}\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\n"
            f"**Promotion: {decision.outcome}** ({decision.metric}): {decision.reason}. Champion before: {champion}."
            f"\n\n[MLflow run]({run_link}) · MLflow model `{model_uri}` · S3 copy `{s3_uri}`\n")


def model_card(params: RetrainParams, data_digest: str, metrics: dict[str, float], decision: Decision,
               run_link: str, flow_run_url: str = "") -> str:
    """A registered version's description: what it was trained on and how, how it scored, whether it is the
    champion, and where its records are."""
    classes = f" (classes {params.classes})" if params.classes else ""
    status = "champion" if decision.promoted else f"not the champion ({decision.outcome})"
    lines = [f"{params.arch} `{params.strategy}` on {public_uri(params.dataset)}{classes}, data sha256 "
             f"{data_digest[:16]}",
             f"recipe: weights {params.weights}, {params.image_size} px, {params.epochs} epochs, batch "
             f"{params.batch_size}, lr {params.lr:g} (warm-up {params.warmup_epochs:g} epochs), augment "
             f"{params.augment}, seed {params.seed}",
             f"test: accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['test_macro_f1']:.4f}",
             f"promotion: {status}: {decision.reason}",
             f"MLflow run: {run_link}"]
    if flow_run_url:
        lines.append(f"Prefect flow run: {flow_run_url}")
    return "\n\n".join(lines)


def skipped_result(params: RetrainParams, fresh: Freshness, tracking_uri: str, flow_run_id: str) -> RetrainResult:
    """skip_if_unchanged found nothing new: report the champion, train nothing, create no MLflow run."""
    from mlflow.tracking import MlflowClient

    assert fresh.champion_run_id and fresh.champion_version
    run = MlflowClient(tracking_uri).get_run(fresh.champion_run_id)
    link = run_url(tracking_uri, fresh.champion_run_id)
    if flow_run_id:
        create_markdown_artifact(markdown=f"# retrain `{params.model_name}`: {fresh.reason}\n\nChampion "
                                 f"v{fresh.champion_version} stays: [MLflow run]({link})\n", key="retrain-summary")
    return RetrainResult(run_id=fresh.champion_run_id, run_url=link, s3_uri=run.data.tags.get("model_s3_uri", ""),
                         model_uri=run.data.tags.get("model_uri", ""),
                         registered_model=params.model_name, version=fresh.champion_version,
                         test_accuracy=run.data.metrics.get("test_accuracy", float("nan")),
                         test_macro_f1=run.data.metrics.get("test_macro_f1", float("nan")), history=[],
                         promotion=SKIPPED, promotion_reason=fresh.reason, champion_version=fresh.champion_version,
                         freshness=fresh.reason)


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata: importing ray here, before ``init_ray`` set its
    loopback switch, would make it rewrite a 127.0.0.1 RAY_ADDRESS to the machine's public IP."""
    from importlib.metadata import version

    return {"python": platform.python_version()} | {
        name: version(name) for name in ("torch", "torchvision", "ray", "mlflow", "prefect")}


@contextmanager
def open_run(params: RetrainParams, settings: Settings, tracking_uri: str,
             tags: dict[str, str]) -> Iterator[tuple[Tracker, RunLease]]:
    """The run's MLflow run (new, or reopened for a resume: same run, same Ray run name, so Ray Train restores
    the last checkpoint) under its run lease, held until the block ends: a second process resuming the same
    run is refused instead of racing this one to the same S3 prefix."""
    owner = f"flow run {flow_run.get_name() or _flow_run_name()}"
    if params.resume_run_id:
        with run_lease(settings, params.resume_run_id, owner) as lease:
            tracker = reopen_run(tracking_uri, params.resume_run_id, params.identity())
            tracker.set_tags(tags | {"resumed": "true"})
            yield tracker, lease
        return
    tracker = start_run(tracking_uri, settings.experiment, flow_run.get_name() or _flow_run_name(), tags=tags)
    lease = run_lease(settings, tracker.run_id, owner)
    try:  # a new run id: the lease is free, and only S3 failing can refuse it
        lease.acquire()
    except BaseException:
        with suppress(Exception):
            tracker.end("FAILED")
        raise
    try:
        yield tracker, lease
    finally:
        lease.release()


@flow(name="retrain", flow_run_name=_flow_run_name, timeout_seconds=FLOW_TIMEOUT_S, log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> RetrainResult:  # noqa: B008 - pydantic default
    """Fine-tune a ResNet with one head strategy and publish it (S3 + MLflow registry)."""
    return cancel_on_interrupt(_retrain, params)  # type: ignore[return-value]  # CANCELLED on Ctrl-C/SIGTERM


def _retrain(params: RetrainParams) -> RetrainResult:
    settings = load_settings()
    tracking_uri, _ = require_servers(settings)
    spec = parse_strategy(params.strategy)

    stage("download")
    data = download_data(params.data_spec(), settings)
    freshness = ""
    if params.skip_if_unchanged and not params.resume_run_id:
        fresh = check_unchanged(tracking_uri, params.model_name, data.files_digest, params.identity())
        print(fresh.reason)
        freshness = fresh.reason
        if fresh.unchanged:
            stage("done")
            return skipped_result(params, fresh, tracking_uri, str(flow_run.get_id() or ""))

    stage("build")
    weights, warm_version = resolve_warm_start(params, tracking_uri)
    built = build_head_model(params.arch, data.num_classes, params.strategy, weights, settings,
                             params.head_options(), params.seed)

    links = prefect_context()
    tags = {"dataset": public_uri(params.dataset), "arch": params.arch, "strategy": spec.name, "shape": spec.shape,
            "pool": spec.pool, "schedule": spec.schedule, "seed": str(params.seed), "model_name": params.model_name,
            **links}
    with open_run(params, settings, tracking_uri, tags) as (tracker, lease), \
            tracker.lifecycle():  # FAILED on any error: the run stays, nothing half-published is visible
        derived: dict[str, Any] = {
            "num_classes": data.num_classes, "class_names": ",".join(data.class_names),
            "class_indices": ",".join(map(str, data.class_indices)), "train_size": len(data.train),
            "val_size": len(data.val), "test_size": len(data.test), "skipped_images": data.skipped,
            "in_features": built.model.in_features, "trainable_params": built.trainable,
            "total_params": built.total, "weights_source": built.weights_source,
            "warm_start_version": warm_version or "none", DATA_DIGEST_PARAM: data.files_digest,
            "data_source_uri": data.source, **({"archive_sha256": data.archive_sha256} if data.archive_sha256 else {}),
            **{f"{split}_data_sha256": digest for split, digest in data.digests.items()}}
        phases = describe_plan(built.model, spec.schedule, params.epochs, params.probe_epochs, params.lr)
        if not params.resume_run_id:  # a resumed run keeps the params it logged (MLflow params are immutable)
            tracker.log_params(params.recorded() | derived | flatten("version", versions()) |
                               phase_params(phases))
            tracker.log_dict(phases, "training/phases.json")
            log_datasets(tracker, data, public_uri(params.dataset))

        stage("train")
        outcome = train_model(params.train_config(spec.name, data.num_classes), data.train, data.val,
                              built.initial_state(), settings, tracking_uri, tracker.run_id, run_key=tracker.run_id)
        built.model.load_state_dict(outcome.state_dict)
        tracker.set_tags(outcome.tags())
        log_learning_curves(outcome.history, tracker)

        stage("evaluate")
        metrics = evaluate_model(built.model, data.test, data.class_names, tracker)

        stage("publish")
        lease.check()  # another process took this run over while we stalled: it publishes, not us
        manifest = build_manifest(
            built.model, model_name=params.model_name, class_names=data.class_names,
            class_indices=data.class_indices, image_size=params.image_size,
            data=asdict(params.data_spec()) | {"dataset": public_uri(params.dataset)}, lineage=lineage(data),
            metrics=metrics.as_dict(),
            run_id=tracker.run_id,
            head=params.head_options(), channels=int(data.test.images.shape[1]))
        publication = publish_model(built.model, manifest, data.test.images, settings, tracker)
        prune_run_checkpoints(tracker.run_id, settings)  # the run's key in Ray is its MLflow run id

        stage("promote")
        policy = PromotionPolicy(params.promote, params.promotion_metric, params.min_margin)
        decision = promote_model(publication, metrics.as_dict(), data.test, data.digests["test"], data.class_names,
                                 policy, settings, tracker, context={k: v for k, v in links.items() if v})
    link = run_url(tracking_uri, tracker.run_id)
    emit_outcome(params.model_name, publication.version, decision.outcome, {  # for Prefect automations
        "metric": decision.metric, "challenger_score": round(decision.challenger_score, 4),
        "champion_version": decision.champion_version or "", "reason": decision.reason, "run_url": link,
        "champion_score": "" if decision.champion_score is None else round(decision.champion_score, 4)})
    describe_version(tracking_uri, params.model_name, publication.version,
                     model_card(params, data.files_digest, metrics.as_dict(), decision, link,
                                links.get("prefect.flow_run_url", "")))
    champion = alias_version(tracking_uri, params.model_name, CHAMPION_ALIAS)
    if links["prefect.flow_run_id"]:
        create_link_artifact(link=link, link_text=f"MLflow run of {params.model_name} v{publication.version}",
                             key="retrain-mlflow-run")
        summary = summary_markdown(params, metrics.as_dict() | metrics.inference, decision, link, publication.s3_uri,
                                   publication.model_uri)
        create_markdown_artifact(markdown=summary, key="retrain-summary")
    stage("done")
    return RetrainResult(run_id=tracker.run_id, run_url=link, s3_uri=publication.s3_uri,
                         model_uri=publication.model_uri, registered_model=publication.registered_model,
                         version=publication.version,
                         test_accuracy=metrics.accuracy, test_macro_f1=metrics.macro_f1,
                         test_metrics=metrics.as_dict() | metrics.inference, history=outcome.history,
                         promotion=decision.outcome, promotion_reason=decision.reason, freshness=freshness,
                         champion_version=champion.version if champion else None)
