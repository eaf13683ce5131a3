"""Running a flow from a command, in this process: its parameters validated and the servers checked before
Prefect, Ray or the flow are imported (``checked``), then the flow under the live display, with Ctrl-C as an
orderly abort (``run_flow``); ``run_retrain`` and ``run_compare`` print what the commands print."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from rich.text import Text

from flows.output import console, console_without_tracebacks, err, fail, first_line, say, validation_line
from infra.errors import HeadbenchError
from infra.settings import Settings

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")


def require_up(name: str, url: str | None) -> None:
    """One line naming the URL when a server's health endpoint does not answer (a few seconds at most)."""
    from infra.stack.services import http_ok

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
    from infra.storage.s3 import s3_client, s3_errors

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


def checked(settings: Settings, params_cls: type[P], values: dict[str, Any], verbose: bool = False) -> P:
    """The flow's parameters from the command's values, and the servers checked, before anything heavy is
    imported: a bad value or a missing server is one line within seconds. Call first: the environment it
    exports is what Prefect reads when it is imported."""
    settings.export_env()  # before prefect is imported: it reads PREFECT_API_URL once
    quiet_console(verbose)
    try:
        params = params_cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        fail(validation_line(exc))
    try:
        preflight(settings)
    except HeadbenchError as exc:
        fail(str(exc))
    return params


def run_flow(settings: Settings, flow_fn: Callable[[P], R], params: P) -> R:
    """Run a flow in this process against the servers, with the live display; Ctrl-C aborts it in order
    (``checked`` first)."""
    from prefect.exceptions import CancelledRun

    from flows.console import LiveProgress
    from flows.stages import listening
    from infra.data.download import watching

    console_without_tracebacks()

    from infra.processes.interrupts import interrupt

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
    """`headbench run`: the retrain flow, then its figures and where its records are."""
    from flows.params import RetrainParams

    params = checked(settings, RetrainParams, values, verbose)
    from flows.retrain import retrain

    result = run_flow(settings, retrain, params)
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
    """`headbench compare`: the compare-heads flow, then its table and verdict."""
    from flows.params import CompareParams

    params = checked(settings, CompareParams, values, verbose)
    from flows.compare import compare_heads

    result = run_flow(settings, compare_heads, params)
    from flows.console import comparison_table

    console.print(comparison_table(result.table, console.width))
    say(result.verdict)
    say(f"MLflow parent run : {result.parent_run_url}  ({len(result.children)} child runs)")
    return result



def run_study(settings: Settings, values: dict[str, Any], verbose: bool = False) -> Any:
    """`headbench study`: the study flow, then its verdicts and where the report is."""
    from flows.params import StudyParams  # not from flows.study: that imports Prefect, which `checked` must precede

    params = checked(settings, StudyParams, values, verbose)
    from flows.study import study

    result = run_flow(settings, study, params)
    for cell in result.cells:
        say(f"{cell['label']}: winner {cell['winner']}{' (read back, not trained again)' if cell['reused'] else ''}")
    for line in result.verdicts:
        say(line)
    say(f"MLflow study run : {result.parent_run_url}  (study/report.md, study/heatmap.png)")
    return result
