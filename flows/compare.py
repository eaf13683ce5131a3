"""The `compare-heads` flow: every strategy x seed, same split and budget, under one MLflow parent run.

download -> (build + fine-tune + test) per strategy x seed, in parallel as Ray's CPUs allow -> table,
chart and verdict on the parent run, a Prefect table artifact and a link back to MLflow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.params import CompareParams
from flows.retrain import prefect_context, run_params, versions
from flows.stages import cancel_on_interrupt, stage
from infra.settings import load_settings, require_servers
from infra.tracking.runs import flatten, run_url, start_run
from infra.training.cluster import cluster_node_cpus, workers_that_fit
from infra.uris import public_uri
from tasks import FLOW_TIMEOUT_S
from tasks.build import resolve_weights
from tasks.compare import ChildResult, fit_strategy, markdown_table, report_comparison, table_records, tune_strategy
from tasks.data import download_data


class CompareResult(BaseModel):
    parent_run_id: str
    parent_run_url: str
    table: list[dict[str, Any]]
    markdown: str
    winner: str
    verdict: str
    children: list[str]


def _flow_run_name() -> str:
    p, dataset = run_params()
    return f"compare-{dataset}-{p.get('arch', 'resnet18')}-{len(p.get('strategies') or [])}x{p.get('seeds', 2)}"


@flow(name="compare-heads", flow_run_name=_flow_run_name, timeout_seconds=FLOW_TIMEOUT_S, log_prints=True)
def compare_heads(params: CompareParams = CompareParams()) -> CompareResult:  # noqa: B008 - pydantic default
    """Compare head strategies under equal compute, repeated over seeds."""
    return cancel_on_interrupt(_compare_heads, params)  # type: ignore[return-value]  # CANCELLED on Ctrl-C/SIGTERM


def _compare_heads(params: CompareParams) -> CompareResult:
    settings = load_settings()
    tracking_uri, _ = require_servers(settings)

    stage("download")
    data = download_data(params.data_spec(), settings)
    weights = resolve_weights(params.weights, settings)  # fetched and verified once, shared by every child

    parent = start_run(tracking_uri, settings.experiment, flow_run.get_name() or _flow_run_name(), tags={
        "headbench.kind": "compare", "dataset": public_uri(params.dataset), "arch": params.arch, **prefect_context()})
    with parent.lifecycle():
        common = params.recorded(exclude={"strategies", "seeds", "parallel", "seed"}) | {
            "num_classes": data.num_classes, "class_names": ",".join(data.class_names),
            "train_size": len(data.train), "val_size": len(data.val), "test_size": len(data.test),
            "weights_source": weights or "none", "data_seed": params.seed} | flatten("version", versions())
        parent.log_params(common | {"strategies": ",".join(params.strategies), "seeds": params.seeds})

        cpus = params.cpus_per_worker or 1
        lrs = {strategy: params.lr for strategy in params.strategies}
        if params.tune == "lr":  # one strategy at a time, its trials as many at once as the cluster holds
            stage("tune")
            for strategy in params.strategies:
                lrs[strategy] = tune_strategy(
                    strategy, params.train_config(strategy, data.num_classes, cpus_per_worker=cpus), data, weights,
                    params.tune_trials, settings, tracking_uri, settings.experiment, parent.run_id)

        stage("train")
        jobs = [(strategy, params.seed + i) for i in range(params.seeds) for strategy in params.strategies]
        parallel = params.parallel or max(1, workers_that_fit(cpus, cluster_node_cpus(settings)) // params.workers)
        results: list[ChildResult] = []
        for start in range(0, len(jobs), parallel):  # a wave of children at a time, as the cluster fits them
            futures = [fit_strategy.submit(
                strategy, seed, params.train_config(strategy, data.num_classes, seed=seed, cpus_per_worker=cpus,
                                                    lr=lrs[strategy]),
                data, weights, common, settings, tracking_uri, settings.experiment, parent.run_id)
                for strategy, seed in jobs[start:start + parallel]]
            results.extend(f.result() for f in futures)

        stage("evaluate")
        comparison = report_comparison(results, parent)
    url = run_url(tracking_uri, parent.run_id)
    markdown = markdown_table(comparison)
    create_table_artifact(table=table_records(comparison), key="head-comparison",
                          description=f"compare-heads: {comparison.verdict()}")
    create_link_artifact(link=url, link_text="MLflow parent run", key="head-comparison-mlflow")
    create_markdown_artifact(markdown=f"# Head strategy comparison\n\n{markdown}\n[MLflow parent run]({url})",
                             key="head-comparison-summary")
    stage("done")
    return CompareResult(parent_run_id=parent.run_id, parent_run_url=url, table=table_records(comparison),
                         markdown=markdown, winner=comparison.winner, verdict=comparison.verdict(),
                         children=[r.run_id for r in results])

