"""The `headbench` command line: local stack (up/down/status), retraining runs and the demo.

Prefect, Ray and MLflow are imported inside commands, after the settings have exported the standard variables,
so Prefect reads the right API URL. `run` and `compare` take their options from the flows' parameters
(``flows.options``).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from flows.options import params_command
from flows.output import console, fail, first_line, say, validation_line
from flows.params import CompareParams, RetrainParams, StudyParams
from flows.runner import require_up, run_compare, run_retrain, run_study
from infra.errors import HeadbenchError
from infra.settings import Settings, load_settings

app = typer.Typer(help="headbench: fine-tune pretrained ResNets with comparable head strategies "
                  "(Prefect flows, Ray Train, MLflow, S3).", no_args_is_help=True, add_completion=False)
HomeOpt = Annotated[Path | None, typer.Option("--home", help="state directory of the local stack "
                                              "[env: HEADBENCH_HOME; default .headbench]")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="also show Ray's worker output and Prefect's "
                                          "INFO logs (MLflow and Prefect keep them either way)")]


@app.callback()
def _private_files() -> None:
    """Every file a command creates (the dataset and weights caches under $HEADBENCH_HOME, the env file) is
    private to the user: 0600 files, 0700 folders."""
    os.umask(0o077)


def _settings(home: Path | None) -> Settings:
    try:
        return load_settings(home)
    except HeadbenchError as exc:  # a bad environment variable, named with its value
        fail(str(exc))


# ------------------------------------------------------------------------------------------- stack


@app.command()
def up(home: HomeOpt = None,
       backend: Annotated[str | None, typer.Option(help="store of MLflow and Prefect: sqlite (files under "
                                                   "$HEADBENCH_HOME) or postgres (a PostgreSQL server the stack "
                                                   "runs, data under $HEADBENCH_HOME/postgres, unless "
                                                   "--database-url names one) [default: sqlite, or what this "
                                                   "stack was started with]")] = None,
       database_url: Annotated[str | None, typer.Option(help="postgres on an external server: "
                                                        "postgresql://user@host:5432/name; databases name_mlflow "
                                                        "and name_prefect are created when missing. A URL with a "
                                                        "password goes in HEADBENCH_DATABASE_URL (a command line is "
                                                        "readable by every user)")] = None,
       ray_nodes: Annotated[int | None, typer.Option(help="a Ray cluster of a head and N-1 worker nodes on this "
                                                     "machine, which every run trains on (RAY_ADDRESS in the env "
                                                     "file); 0 = a private Ray per run [default: 0, or what this "
                                                     "stack was started with]")] = None,
       ray_cpus: Annotated[str | None, typer.Option(help="CPUs each Ray node offers: one count for every node, "
                                                    "or a comma list with one per node, head first (2,1) "
                                                    "[default: the machine's CPUs shared evenly]")] = None) -> None:
    """Start SeaweedFS S3, MLflow, Prefect, a Prefect worker, (--ray-nodes N) a Ray cluster and (--backend
    postgres) a PostgreSQL server on 127.0.0.1 (idempotent) and write $HEADBENCH_HOME/env."""
    from infra.stack.local import LocalStack
    from infra.stack.postgres import check_no_password

    started = time.perf_counter()
    try:
        check_no_password(database_url)
        stack = LocalStack(_settings(home), backend=backend, database_url=database_url, ray_nodes=ray_nodes,
                           ray_cpus=ray_cpus)
        stack.up(on_ready=lambda name, url, already: say(
            f"  {name:<10} {'already running' if already else 'ready':<16} {url}"))
    except HeadbenchError as exc:
        fail(str(exc))
    console.print(f"stack up in {time.perf_counter() - started:.1f} s")
    say(f"  MLflow UI  : {stack.mlflow_url}  (log in as MLFLOW_TRACKING_USERNAME with MLFLOW_TRACKING_PASSWORD "
        "from the env file)")
    say(f"  Prefect UI : {stack.prefect_url}  (log in with PREFECT_API_AUTH_STRING from the env file)")
    say(f"  S3 endpoint: {stack.s3_url}")
    if stack.backend == "postgres":
        from infra.uris import redact_url

        say(f"  stores     : PostgreSQL {redact_url(stack.database('mlflow'))}, "
            f"{redact_url(stack.database('prefect'))}")
    if stack.ray_address:
        say(f"  Ray cluster: RAY_ADDRESS={stack.ray_address}, {stack.ray_nodes} node(s), CPUs "
            f"{','.join(map(str, stack.ray_node_cpus))}, "
            f"dashboard {stack.ray_dashboard_url}")
    say(f"  env file   : {stack.env_file}  (source it to use the stack from other tools)")


@app.command()
def down(home: HomeOpt = None) -> None:
    """Stop what `up` started (by pid; workers before servers)."""
    from infra.stack.local import LocalStack

    stopped = LocalStack(_settings(home)).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(home: HomeOpt = None) -> None:
    """Show the local stack's services, pids, health and URLs (exit 3 unless all are healthy)."""
    from infra.stack.local import LocalStack

    rows = LocalStack(_settings(home)).status()
    table = Table("service", "pid", "state", "url")
    for row in rows:
        state = "healthy" if row.healthy else ("starting/unhealthy" if row.running else "stopped")
        table.add_row(row.name, str(row.pid or "-"), state, row.url)
    console.print(table)
    if not all(r.healthy for r in rows):
        raise typer.Exit(3)


@app.command()
def gc(home: HomeOpt = None,
       limit_gb: Annotated[float | None, typer.Option(help="the size to bring the cache within "
                                                      "[default: HEADBENCH_CACHE_LIMIT_GB, 20]")] = None,
       grace_s: Annotated[float, typer.Option(help="spare entries used within this many seconds "
                                              "(a running flow may be reading them)")] = 600,
       dry_run: Annotated[bool, typer.Option(help="list what would go, remove nothing")] = False) -> None:
    """Remove the least recently used ImageFolder mirrors and weight copies from the local cache until it
    fits the limit (each can be fetched again from S3; built-in datasets are kept)."""
    from infra.data.cache import cache_entries, collect, human

    for name, value in (("--limit-gb", limit_gb), ("--grace-s", grace_s)):
        if value is not None and not value >= 0:  # NaN too
            fail(f"{name}: Input should be greater than or equal to 0 (got {value:g})")
    settings = _settings(home)
    limit = settings.cache_limit_gb if limit_gb is None else limit_gb
    before = sum(e.size for e in cache_entries(settings.cache_dir))
    removed, left = collect(settings.cache_dir, int(limit * 1e9), grace_s=grace_s, dry_run=dry_run)
    for entry in removed:
        say(f"{'would remove' if dry_run else 'removed'} {entry.path} ({human(entry.size)})")
    say(f"cache {settings.cache_dir}: {human(before)} -> {human(left)} (limit {limit:g} GB"
        f"{', over it: the rest was used in the last ' + f'{grace_s:g} s' if left > limit * 1e9 else ''})")


# ------------------------------------------------------------------------------------------- runs

# `run` and `compare` take one option per field of their flow's parameters (flows.options): the CLI, the
# Prefect form and `deploy --param` read the same declarations.
_HOME_AND_VERBOSE = [inspect.Parameter("home", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=HomeOpt),
                     inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False,
                                       annotation=VerboseOpt)]


def run(values: dict[str, Any], home: Path | None = None, verbose: bool = False) -> None:
    """Run one retraining (the `retrain` Prefect flow) and print the MLflow run URL and the S3 URI."""
    run_retrain(_settings(home), values, verbose)


def compare(values: dict[str, Any], home: Path | None = None, verbose: bool = False) -> None:
    """Compare head strategies x seeds on one split (the `compare-heads` flow); prints the table."""
    run_compare(_settings(home), values, verbose)


def study(values: dict[str, Any], home: Path | None = None, verbose: bool = False) -> None:
    """Head strategies across data regimes (the `study` flow): one comparison per grid cell (cells finished
    before are read back), one report with a leaderboard per cell, a heatmap and a verdict per strategy."""
    run_study(_settings(home), values, verbose)


app.command("run")(params_command(RetrainParams, run, extra=_HOME_AND_VERBOSE))
app.command("compare")(params_command(CompareParams, compare, extra=_HOME_AND_VERBOSE))
app.command("study")(params_command(StudyParams, study, extra=_HOME_AND_VERBOSE, exclude=StudyParams.CELL_FIELDS))


@app.command()
def datasets() -> None:
    """List the named datasets: classes, channels, native size, split sizes and where they download from."""
    from infra.data.catalogue import CATALOGUE

    mirror = _settings(None).dataset_mirror
    table = Table("dataset", "classes", "channels", "size", "train / test", "source")
    for entry in CATALOGUE.values():
        names = ", ".join(entry.classes[:4]) + (", ..." if len(entry.classes) > 4 else "")
        table.add_row(Text(entry.name), Text(f"{len(entry.classes)}: {names}"),
                      "gray" if entry.channels == 1 else "RGB", f"{entry.native_size} px",
                      f"{entry.train_size:,} / {entry.test_size:,}", Text(entry.source_uri(mirror)))
    console.print(table)
    console.print(Text("Other sources: a local ImageFolder directory, s3://bucket/prefix, or an http(s) URL of an "
                       "ImageFolder archive (--dataset-sha256 pins it). HEADBENCH_DATASET_MIRROR="
                       + (mirror or "<base URL>") + " fetches named datasets from <mirror>/<dataset>/<file>."))


@app.command()
def strategies() -> None:
    """List the named head strategies and the shapes, poolings and schedules they combine."""
    from models.heads import HEAD_SHAPES, POOLS
    from models.strategies import SCHEDULES, list_strategies

    table = Table("strategy", "description")
    for name, description in list_strategies().items():
        table.add_row(name, description)
    console.print(table)
    console.print("shapes   : " + ", ".join(HEAD_SHAPES))
    console.print("poolings : " + ", ".join(POOLS))
    console.print("schedules: " + ", ".join(SCHEDULES))


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "classes=0-4"]`` -> {"epochs": "3", "classes": "0-4"} (pydantic converts the types)."""
    values: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--param {item!r}: expected KEY=VALUE, e.g. --param epochs=3")
        values[key.strip().replace("-", "_")] = value.strip()
    return values


@app.command()
def deploy(
    cron: Annotated[str, typer.Option(help="schedule of retrain/scheduled (cron, 5 fields)")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule")] = "UTC",
    param: Annotated[list[str] | None, typer.Option(
        help="default parameter of the scheduled retrain, KEY=VALUE, repeatable (any `headbench run` option, "
             "e.g. --param classes=0-4 --param epochs=3)")] = None,
    paused: Annotated[bool, typer.Option(help="create the schedule paused")] = False,
    notify: Annotated[str | None, typer.Option(help="webhook URL (http or https) for alerts: a failed or crashed "
                                               "run of the deployments, a rejected challenger, a new champion "
                                               "(Prefect automations; the URL goes in a Prefect block)")] = None,
    notify_block: Annotated[str | None, typer.Option(help="send the alerts through this existing Prefect "
                                                     "notification block instead, <type slug>/<name> as `prefect "
                                                     "block ls` lists it (Slack, email, ...)")] = None,
    home: HomeOpt = None,
) -> None:
    """Register the deployments `retrain/scheduled` (cron) and `compare-heads/on-demand` on the Prefect server,
    running on the local `process` work pool (the worker `headbench up` started); with --notify, alerts."""
    settings = _settings(home)
    settings.export_env()  # before prefect is imported
    from flows.deploy import SCHEDULED_DEFAULTS, deploy_all

    try:
        params = RetrainParams(**(SCHEDULED_DEFAULTS | parse_assignments(param or [])))
    except ValidationError as exc:
        fail(validation_line(exc).replace("--", "--param ", 1))
    if notify and notify_block:
        fail("--notify and --notify-block: give one of them (a webhook URL, or an existing Prefect block)")
    from flows.alerts import check_webhook_url, create_automations, notification_block

    try:
        if notify:
            check_webhook_url(notify)  # before anything is deployed
        require_up("Prefect API", settings.prefect_api_url)
        deployed = deploy_all(settings, cron=cron, timezone=timezone, retrain_params=params, paused=paused)
        alerts = create_automations(notification_block(notify, notify_block), [d.id for d in deployed]) \
            if notify or notify_block else []
    except HeadbenchError as exc:
        fail(str(exc))
    for d in deployed:
        when = f"cron '{cron}' ({timezone}){' paused' if paused else ''}" if d.target.scheduled else "on demand"
        say(f"deployed {d.target.full_name:<26} {when:<32} {d.url}")
    if alerts:
        from infra.uris import public_uri

        say(f"alerts     : {len(alerts)} Prefect automations ({'; '.join(alerts)}) -> "
            f"{public_uri(notify) if notify else notify_block}")
    say(f"work pool '{settings.work_pool}' (process). Trigger a run: the deployment's 'Run > Custom run' in the "
        f"UI, or `prefect deployment run '{deployed[0].target.full_name}' --param ...`")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (any format PIL reads)")],
    model: Annotated[str, typer.Option(help="models:/<name>@<alias>, models:/<name>/<version> or s3://... "
                                       "of a published model")] = "models:/headbench-classifier@champion",
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="classes to print per image")] = 3,
    home: HomeOpt = None,
) -> None:
    """Classify image files with a published model, preprocessing as its manifest says; prints top-k."""
    settings = _settings(home)
    settings.export_env()
    from infra.publishing.load import load_published, publication_of
    from models.predict import load_images, top_k

    if not model.startswith(("models:/", "s3://")):
        fail(f"--model {model!r}: expected models:/<name>@<alias>, models:/<name>/<version> or s3://bucket/prefix")
    try:
        if model.startswith("models:/"):
            if not settings.mlflow_tracking_uri:
                fail("MLFLOW_TRACKING_URI is not set and no local stack env file was found; run `headbench up`")
            require_up("MLflow tracking server", settings.mlflow_tracking_uri)
        source = publication_of(model, settings)
        net, manifest = load_published(source, settings)
        batch = load_images(images, int(manifest["image_size"]), int(manifest.get("channels", 3)))
    except (HeadbenchError, ValueError) as exc:
        fail(first_line(exc))
    probs, indices = top_k(net, batch, top)
    names = manifest["class_names"]
    say(f"model {manifest['model_name']} ({manifest['arch']} {manifest['strategy']}, {source})")
    for path, p_row, i_row in zip(images, probs.tolist(), indices.tolist(), strict=True):
        say(f"{path}: " + ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(p_row, i_row, strict=True)))


@app.command()
def demo(home: HomeOpt = None,
         weights: Annotated[str | None, typer.Option(help="skip the source pretraining and start the comparison "
                                                     "from these weights, e.g. DEFAULT (ImageNet, needs "
                                                     "internet)")] = None,
         verbose: VerboseOpt = False) -> None:
    """Transfer demo: `up`; pretrain a source model on Fashion-MNIST classes 0-4 and publish it; then
    compare head strategies on classes 5-9 starting from that published backbone."""
    from flows.params import DEMO_SOURCE, DEMO_TARGET

    started = time.perf_counter()
    up(home, None, None)
    settings = _settings(home)
    if weights is None:
        console.rule("1/2 source model: classes 0-4, random init, published to S3 and the registry")
        source = run_retrain(settings, DEMO_SOURCE, verbose)
        weights = source.s3_uri
    console.rule(Text(f"2/2 target task: classes 5-9 from {weights}"))
    result = run_compare(settings, DEMO_TARGET | {"weights": weights}, verbose)
    from infra.stack.local import LocalStack

    stack = LocalStack(settings)
    console.rule(f"where to look (demo took {time.perf_counter() - started:.0f} s)")
    say(f"MLflow UI  : {stack.mlflow_url}  experiment '{settings.experiment}': the parent run "
        f"{result.parent_run_id} has the comparison table and chart (artifacts/comparison); select its child "
        "runs and press Compare to see them side by side; Models: 'demo-source-fashion-0-4'")
    say(f"Prefect UI : {stack.prefect_url}  flow runs 'retrain' and 'compare-heads' (Artifacts: head-comparison)")
    say(f"S3 models  : s3://{settings.model_bucket}/  (model.safetensors + manifest.json per run)")
    say(f"logins     : in {stack.env_file}: MLflow user MLFLOW_TRACKING_USERNAME, password "
        "MLFLOW_TRACKING_PASSWORD; Prefect's login box takes PREFECT_API_AUTH_STRING")
    say("stop it all: headbench down")



def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
