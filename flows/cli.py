"""The `headbench` command line: local stack (up/down/status), retraining runs and the demo.

Heavy imports (torch, ray, prefect, mlflow) happen inside commands, after the settings have exported the
standard variables, so `--help` is fast and Prefect reads the right API URL.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.cli import app as bench_app
from infra.errors import HeadbenchError
from infra.settings import Settings, load_settings
from models.data import clip

app = typer.Typer(help="headbench: fine-tune pretrained ResNets with comparable head strategies "
                  "(Prefect flows, Ray Train, MLflow, S3).", no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", help="state directory of the local stack "
                                              "[env: HEADBENCH_HOME; default .headbench]")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="also show Ray's worker output and Prefect's "
                                          "INFO logs (MLflow and Prefect keep them either way)")]


@app.callback()
def _private_files() -> None:
    """Every file a command creates (the dataset and weights caches under $HEADBENCH_HOME, the env file) is
    private to the user: 0600 files, 0700 folders."""
    os.umask(0o077)


def say(line: str) -> None:
    """Print one unwrapped line (URLs stay copyable). No markup: lines carry user text (paths, class names,
    URIs) in which ``[x]`` or ``[/]`` would be eaten or crash Rich's markup parser."""
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def drain_prefect(timeout_s: float = 5.0) -> None:
    """Deliver what Prefect still queues (events, API log lines) now. Its own drain runs at interpreter exit
    and, when the queue is not yet empty (a loaded machine), logs 'Still processing items: N items
    remaining...', which would land after the error line."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout_s, at_exit=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """The one-line error contract: ``error: <message>`` on stderr, exit ``code``, as the last line (Prefect's
    queues are drained first); the message is user text."""
    drain_prefect()
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def validation_line(exc: ValidationError) -> str:
    """First pydantic error as one line: the field (as its CLI option), the reason and the bad value."""
    e = exc.errors()[0]
    field = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    option = f"--{field.replace('_', '-')}: " if field else ""
    got = e.get("input")
    suffix = f" (got {clip(repr(got), 80)})" if field and not isinstance(got, dict) else ""
    return f"{option}{msg}{suffix}"


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
    from infra.stack import LocalStack, check_no_password

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
        from infra.stack import redact_url

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
    from infra.stack import LocalStack

    stopped = LocalStack(_settings(home)).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(home: HomeOpt = None) -> None:
    """Show the local stack's services, pids, health and URLs (exit 3 unless all are healthy)."""
    from infra.stack import LocalStack

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
    from infra.cache import cache_entries, collect, human

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


class _NoTraceback(logging.Formatter):
    """Formats a copy of each record without its traceback: the terminal gets one line per failure,
    while Prefect's API log handler (the UI) still receives the full traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def console_without_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _NoTraceback):
            handler.setFormatter(_NoTraceback(handler.formatter))


def require_up(name: str, url: str | None) -> None:
    """One line naming the URL when a server's health endpoint does not answer (a few seconds at most)."""
    from infra.stack import http_ok

    if not url or not http_ok(f"{url.rstrip('/')}/health"):
        raise HeadbenchError(f"{name} unreachable at {url} (is it running? `headbench up`)")


def require_mlflow_login(settings: Settings, tracking_uri: str) -> None:
    """One line when the MLflow server refuses this process's login (MLFLOW_TRACKING_USERNAME/PASSWORD, or none):
    its health probe answers anyone, its API does not."""
    import urllib.error
    import urllib.request

    from infra.uris import basic_auth

    password = settings.mlflow_tracking_password.get_secret_value() if settings.mlflow_tracking_password else ""
    headers = basic_auth(f"{settings.mlflow_tracking_username}:{password}" if settings.mlflow_tracking_username
                         else None)
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - the configured tracking URI
    try:
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - the configured tracking URI
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise HeadbenchError(f"MLflow at {tracking_uri} refused the login (HTTP {exc.code}); check "
                                 "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (a local stack's are in "
                                 "$HEADBENCH_HOME/env)") from None
    except (urllib.error.URLError, OSError, ValueError):
        pass  # unreachable: require_up said so already, or a transient fault the run's retries handle


def preflight(settings: Settings) -> None:
    """Fail fast, before any download or training, when a server is missing, unreachable or refuses the login."""
    from infra.settings import require_servers

    tracking_uri, s3_url = require_servers(settings)
    require_up("MLflow tracking server", tracking_uri)
    require_mlflow_login(settings, tracking_uri)
    if settings.prefect_api_url:  # unset: Prefect runs the flow against a temporary local server
        require_up("Prefect API", settings.prefect_api_url)
    from infra.s3 import s3_client, s3_errors

    with s3_errors(s3_url, f"checking the model bucket {settings.model_bucket!r}"):
        s3_client(settings, max_attempts=2).head_bucket(Bucket=settings.model_bucket)


def quiet_console(verbose: bool) -> None:
    """Before Prefect, MLflow and Ray are imported: by default the terminal gets the live display and errors
    only (Prefect's INFO lines still reach its API, Ray's output its log files); ``verbose`` forwards all."""
    if verbose:
        os.environ["HEADBENCH_RAY_LOGS"] = "1"
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


INTERRUPTED_EXIT = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _interrupt_once(signum: int, frame: object) -> None:
    """First Ctrl-C: KeyboardInterrupt, which the flow turns into an orderly abort; later ones are ignored,
    so that a second press cannot cut that clean-up short (it takes a few seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_flow(settings: Settings, kind: str, values: dict[str, Any], verbose: bool = False) -> Any:
    """Validate, preflight, then run a flow (`retrain` or `compare`) in this process against the servers."""
    settings.export_env()  # before prefect is imported: it reads PREFECT_API_URL once
    quiet_console(verbose)
    from flows.params import CompareParams, RetrainParams

    params_cls = RetrainParams if kind == "retrain" else CompareParams
    try:
        params = params_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        fail(validation_line(exc))
    try:
        preflight(settings)
    except HeadbenchError as exc:
        fail(str(exc))

    from flows.console import LiveProgress
    from flows.stages import listening
    from infra.download import watching

    console_without_tracebacks()
    if kind == "retrain":
        from flows.retrain import retrain as flow_fn
    else:
        from flows.compare import compare_heads as flow_fn

    from prefect.exceptions import CancelledRun

    from infra.interrupts import interrupt

    signal.signal(signal.SIGINT, _interrupt_once)
    with LiveProgress(console, settings.mlflow_tracking_uri, settings.experiment) as live:
        try:
            with listening(live.on_stage), watching(live.on_download):
                return flow_fn(params)
        except (KeyboardInterrupt, CancelledRun):  # the flow ended its runs KILLED/CANCELLED, Ray aborted
            live.progress.stop()
            interrupt()
            err.print(Text.assemble(("error:", "bold red"), " interrupted: the Ray job was aborted, the MLflow run "
                                    "is KILLED and the Prefect flow run CANCELLED; nothing was published"),
                      highlight=False, soft_wrap=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # exit now: this driver's end is what aborts its Ray job (Ray kills the job's actors), and the
            # threads still blocked in Ray calls must not hold the process open
            os._exit(INTERRUPTED_EXIT)
        except (HeadbenchError, ValueError) as exc:
            live.progress.stop()
            fail(first_line(exc))
        except Exception as exc:  # noqa: BLE001 - one line here; the full traceback is in the Prefect UI logs
            live.progress.stop()
            fail(f"{exc.__class__.__name__}: {first_line(exc)}")


def run_retrain(settings: Settings, values: dict[str, Any], verbose: bool = False) -> Any:
    result = run_flow(settings, "retrain", values, verbose)
    if result.skipped:
        say(f"{result.promotion_reason}; champion is v{result.champion_version}")
        say(f"MLflow run : {result.run_url}  (the champion's)")
        say(f"S3 model   : {result.s3_uri}")
        return result
    m = result.test_metrics
    top5 = f"  top-5 {m['test_top5_accuracy']:.4f}" if "test_top5_accuracy" in m else ""
    say(f"test accuracy {result.test_accuracy:.4f}  macro-F1 {result.test_macro_f1:.4f}  ECE {m['test_ece']:.4f}"
        f"{top5}")
    say(f"inference  : {m['latency_p50_ms']:.1f} ms p50, {m['latency_p95_ms']:.1f} ms p95 at batch 1; "
        f"{m['throughput_b64_img_s']:.0f} img/s at batch 64 (CPU)")
    say(f"MLflow run : {result.run_url}")
    say(f"MLflow model: {result.model_uri}")
    say(f"S3 model   : {result.s3_uri}")
    say(f"registered : {result.registered_model} version {result.version}")
    if result.freshness:
        say(f"trained    : {result.freshness}")
    say(f"promotion  : {result.promotion} ({result.promotion_reason}); champion is "
        f"{'v' + result.champion_version if result.champion_version else 'unset'}")
    return result


def run_compare(settings: Settings, values: dict[str, Any], verbose: bool = False) -> Any:
    result = run_flow(settings, "compare", values, verbose)
    from flows.console import comparison_table

    console.print(comparison_table(result.table, console.width))
    say(result.verdict)
    say(f"MLflow parent run : {result.parent_run_url}  ({len(result.children)} child runs)")
    return result


# Options shared by `run` and `compare` (typer needs them in each signature; the types live here once).
Dataset = Annotated[str, typer.Option(help="a named dataset (`headbench datasets`), a local ImageFolder dir, "
                                            "s3://bucket/prefix, or an http(s) URL of an ImageFolder archive "
                                            "(.tar.gz, .tgz, .tar, .zip)")]
DatasetSha256 = Annotated[str | None, typer.Option(help="sha256 the http(s) archive must have (64 hex digits); "
                                                   "other content is refused and nothing is cached")]
Classes = Annotated[str | None, typer.Option(help="class subset, e.g. 0-4 or 0,2,7 (default: all)")]
Limit = Annotated[int | None, typer.Option(help="training pool size (train+val), stratified")]
TestLimit = Annotated[int | None, typer.Option(help="test set size, stratified (default: all)")]
ValFraction = Annotated[float, typer.Option(help="validation share of the training pool")]
ImageSize = Annotated[int, typer.Option(help="input size in pixels (>= 32)")]
Arch = Annotated[str, typer.Option(help="resnet18|resnet34|resnet50|resnet101|resnet152")]
Weights = Annotated[str, typer.Option(help="none | DEFAULT | IMAGENET1K_V1 | s3://... | models:/name@alias | path")]
Epochs = Annotated[int, typer.Option(help="training epochs")]
BatchSize = Annotated[int, typer.Option(help="global batch size")]
Lr = Annotated[float, typer.Option(help="peak learning rate (SGD + cosine)")]
WeightDecay = Annotated[float, typer.Option(help="SGD weight decay")]
WarmupEpochs = Annotated[float, typer.Option(help="linear LR warm-up per phase, in epochs")]
Augment = Annotated[str, typer.Option(help="none | flip | standard (RandomResizedCrop + flip)")]
LabelSmoothing = Annotated[float, typer.Option(help="label smoothing of the training loss")]
Patience = Annotated[int | None, typer.Option(help="early stopping: epochs without a lower val loss; publishes "
                                              "the best epoch (default: off)")]
HiddenDim = Annotated[int, typer.Option(help="MLP head hidden width")]
Dropout = Annotated[float, typer.Option(help="MLP head dropout")]
ProbeEpochs = Annotated[int | None, typer.Option(help="lp-ft/gradual: frozen-phase epochs (default: half)")]
CacheFeatures = Annotated[bool, typer.Option(help="frozen phases train the head on features computed once")]
PreciseBn = Annotated[int, typer.Option(help="exact BatchNorm stats from N batches after each backbone epoch")]
Workers = Annotated[int, typer.Option(help="Ray Train workers per run")]
CpusPerWorker = Annotated[int | None, typer.Option(help="CPUs per worker (default: even share)")]
Gpu = Annotated[bool, typer.Option("--gpu/--cpu", help="one GPU per worker")]
Placement = Annotated[str, typer.Option(help="PACK | SPREAD | STRICT_PACK | STRICT_SPREAD: Ray placement of "
                                        "the workers over the cluster's nodes")]
Seed = Annotated[int, typer.Option(help="seed for split, init and shuffling")]


def _values(local: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in local.items() if k not in ("home", "verbose")}
    values["use_gpu"] = values.pop("gpu")
    return values


@app.command()
def run(
    dataset: Dataset = "fashion-mnist", dataset_sha256: DatasetSha256 = None, classes: Classes = None,
    limit: Limit = None, test_limit: TestLimit = None,
    val_fraction: ValFraction = 0.1, image_size: ImageSize = 64, arch: Arch = "resnet18", weights: Weights = "none",
    strategy: Annotated[str, typer.Option(help="head strategy <shape>[:<pool>][+<schedule>] "
                                          "(see `headbench strategies`)")] = "mlp",
    epochs: Epochs = 2, batch_size: BatchSize = 64, lr: Lr = 0.01, weight_decay: WeightDecay = 5e-4,
    warmup_epochs: WarmupEpochs = 0.0, augment: Augment = "flip", label_smoothing: LabelSmoothing = 0.0,
    early_stopping_patience: Patience = None,
    hidden_dim: HiddenDim = 512, dropout: Dropout = 0.2, probe_epochs: ProbeEpochs = None,
    cache_features: CacheFeatures = True, precise_bn_batches: PreciseBn = 20, workers: Workers = 2,
    cpus_per_worker: CpusPerWorker = None, placement_strategy: Placement = "PACK",
    gpu: Gpu = False, seed: Seed = 0,
    model_name: Annotated[str, typer.Option(help="registered model name / S3 prefix")] = "headbench-classifier",
    warm_start: Annotated[str, typer.Option(help="none | champion (start from the current champion's weights)")]
    = "none",
    promote: Annotated[str, typer.Option(help="never | if-better | always: move the 'champion' alias")]
    = "if-better",
    promotion_metric: Annotated[str, typer.Option(help="test_accuracy | test_macro_f1")] = "test_accuracy",
    min_margin: Annotated[float, typer.Option(help="if-better: challenger must beat champion by more")] = 0.0,
    resume_run_id: Annotated[str | None, typer.Option(help="MLflow run id of an unfinished retrain with the same "
                                                      "options: continue it from its last checkpoint")] = None,
    skip_if_unchanged: Annotated[bool, typer.Option(help="train nothing when the champion was trained on the same "
                                                    "data digest with the same options")] = False,
    home: HomeOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Run one retraining (the `retrain` Prefect flow) and print the MLflow run URL and the S3 URI."""
    run_retrain(_settings(home), _values(dict(locals())), verbose)


@app.command()
def compare(
    strategies: Annotated[str, typer.Option(help="comma-separated head strategies (default: the demo set of 6)")]
    = "",
    seeds: Annotated[int, typer.Option(help="repetitions per strategy (seed, seed+1, ...)")] = 2,
    parallel: Annotated[int | None, typer.Option(help="children trained at once (default: as CPUs allow)")] = None,
    tune: Annotated[str, typer.Option(help="none | lr: search each strategy's LR with Ray Tune (ASHA) first")]
    = "none",
    tune_trials: Annotated[int, typer.Option(help="--tune lr: LR values per strategy, log-spaced over 3 decades "
                                             "around --lr")] = 6,
    dataset: Dataset = "fashion-mnist", dataset_sha256: DatasetSha256 = None, classes: Classes = None,
    limit: Limit = None, test_limit: TestLimit = None,
    val_fraction: ValFraction = 0.1, image_size: ImageSize = 64, arch: Arch = "resnet18", weights: Weights = "none",
    epochs: Epochs = 2, batch_size: BatchSize = 64, lr: Lr = 0.01, weight_decay: WeightDecay = 5e-4,
    warmup_epochs: WarmupEpochs = 0.0, augment: Augment = "flip", label_smoothing: LabelSmoothing = 0.0,
    early_stopping_patience: Patience = None,
    hidden_dim: HiddenDim = 512, dropout: Dropout = 0.2, probe_epochs: ProbeEpochs = None,
    cache_features: CacheFeatures = True, precise_bn_batches: PreciseBn = 20, workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = None, placement_strategy: Placement = "PACK",
    gpu: Gpu = False, seed: Seed = 0, home: HomeOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Compare head strategies x seeds on one split (the `compare-heads` flow); prints the table."""
    values = _values(dict(locals()))
    values["strategies"] = [s.strip() for s in strategies.split(",") if s.strip()] or None
    run_compare(_settings(home), values, verbose)


@app.command()
def datasets() -> None:
    """List the named datasets: classes, channels, native size, split sizes and where they download from."""
    from infra.catalogue import CATALOGUE

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
    home: HomeOpt = None,
) -> None:
    """Register the deployments `retrain/scheduled` (cron) and `compare-heads/on-demand` on the Prefect server,
    running on the local `process` work pool (the worker `headbench up` started)."""
    settings = _settings(home)
    settings.export_env()  # before prefect is imported
    from flows.deploy import SCHEDULED_DEFAULTS, deploy_all
    from flows.params import RetrainParams

    try:
        params = RetrainParams(**(SCHEDULED_DEFAULTS | parse_assignments(param or [])))
    except ValidationError as exc:
        fail(validation_line(exc).replace("--", "--param ", 1))
    try:
        require_up("Prefect API", settings.prefect_api_url)
        deployed = deploy_all(settings, cron=cron, timezone=timezone, retrain_params=params, paused=paused)
    except HeadbenchError as exc:
        fail(str(exc))
    for d in deployed:
        when = f"cron '{cron}' ({timezone}){' paused' if paused else ''}" if d.target.scheduled else "on demand"
        say(f"deployed {d.target.full_name:<26} {when:<32} {d.url}")
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
    from infra.published import load_published, publication_of
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
    from infra.stack import LocalStack

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


# `headbench bench` and `headbench bench quality`: the benchmarks' own typer app (bench/cli.py), mounted here
app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
