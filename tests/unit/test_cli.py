"""CLI bad input: one line naming the bad value and what is allowed, exit code 2, nothing run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEADBENCH = [str(Path(sys.executable).parent / "headbench")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], home: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS"))}
    env |= {"HEADBENCH_HOME": str(home), "COLUMNS": "300"} | (extra_env or {})
    return subprocess.run([*HEADBENCH, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("args, expected", [
    (["--arch", "resnet19"], "--arch: Input should be 'resnet18', 'resnet34', 'resnet50', 'resnet101' or "
     "'resnet152' (got 'resnet19')"),
    (["--strategy", "fc-swap"], "--strategy: unknown strategy 'fc-swap': head shape 'fc-swap' is not one of "
     "replace-fc, mlp"),
    (["--classes", "0-12"], "classes 10-12 out of range for a dataset with 10 classes; allowed: 0-9"),
    (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1 (got 0)"),
    (["--lr", "-0.1"], "--lr: Input should be greater than 0 (got -0.1)"),
    (["--image-size", "8"], "--image-size: Input should be greater than or equal to 32 (got 8)"),
    (["--limit", "40", "--batch-size", "64"], "batch_size 64 is larger than the training pool limit 40"),
    (["--classes", "3"], "class list '3' selects 1 class; a classifier needs >= 2"),
    (["--classes", "5-2"], "bad class range '5-2' in '5-2': start > end"),
    (["--classes", "a,b"], "bad class list 'a,b': use indices like '0-4' or '0,2,7'"),
    (["--batch-size", "1"], "--batch-size: Input should be greater than or equal to 2 (got 1)"),
    (["--val-fraction", "0.9"], "--val-fraction: Input should be less than 0.5 (got 0.9)"),
    (["--dropout", "1.5"], "--dropout: Input should be less than 1 (got 1.5)"),
    (["--workers", "0"], "--workers: Input should be greater than or equal to 1 (got 0)"),
    (["--strategy", "conv1x1:catavgmax"], "invalid combination 'conv1x1:catavgmax'"),
    (["--strategy", "mlp+lp-ft", "--epochs", "1"], "lp-ft"),
    (["--warm-start", "yesterday"], "--warm-start: Input should be 'none' or 'champion' (got 'yesterday')"),
    (["--promote", "maybe"], "--promote: Input should be 'never', 'if-better' or 'always' (got 'maybe')"),
    (["--promotion-metric", "loss"], "--promotion-metric: Input should be 'test_accuracy' or 'test_macro_f1'"),
    (["--min-margin", "-1"], "--min-margin: Input should be greater than or equal to 0 (got -1.0)"),
    (["--model-name", "../escape"], "--model-name: String should match pattern"),
    (["--resume-run-id", "not-a-run"], "--resume-run-id: String should match pattern"),
    (["--augment", "rotate"], "--augment: Input should be 'none', 'flip', 'crop' or 'standard' (got 'rotate')"),
    (["--label-smoothing", "1"], "--label-smoothing: Input should be less than 1 (got 1.0)"),
    (["--warmup-epochs", "-1"], "--warmup-epochs: Input should be greater than or equal to 0 (got -1.0)"),
    (["--early-stopping-patience", "0"], "--early-stopping-patience: Input should be greater than or equal to 1 "
     "(got 0)"),
    (["--placement-strategy", "spread"], "--placement-strategy: Input should be 'PACK', 'SPREAD', 'STRICT_PACK' or "
     "'STRICT_SPREAD' (got 'spread')"),
])
def test_bad_options_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                      expected: str) -> None:
    lines = _error_lines("run", args, tmp_path, monkeypatch)
    assert len(lines) == 1 and expected in lines[0], lines


def _error_lines(command: str, args: list[str], home: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Invoke the CLI in-process without a stack; it must exit 2 having downloaded nothing."""
    from typer.testing import CliRunner

    from flows.cli import app

    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "AWS_", "PREFECT_API", "RAY_ADDRESS")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "300")
    result = CliRunner().invoke(app, [command, "--home", str(home), *args])
    assert result.exit_code == 2, result.output
    assert not (home / "cache").exists()  # nothing was downloaded
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("args, expected", [
    (["--tune", "grid"], "--tune: Input should be 'none' or 'lr' (got 'grid')"),
    (["--tune", "lr", "--tune-trials", "1"], "--tune-trials: Input should be greater than or equal to 2 (got 1)"),
])
def test_bad_compare_options_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                              expected: str) -> None:
    assert _error_lines("compare", args, tmp_path, monkeypatch) == [f"error: {expected}"]


def test_bad_option_through_the_real_console_script(tmp_path: Path) -> None:
    result = _run(["run", "--strategy", "mlp:median"], tmp_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: --strategy: unknown pooling 'median' in strategy 'mlp:median'; allowed: avg, max, avgmax, "
        "catavgmax (got 'mlp:median')"]


def test_unreachable_mlflow_fails_fast_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    result = _run(["run"], tmp_path, {"MLFLOW_TRACKING_URI": url,
                                      "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_free_port()}"})
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: MLflow tracking server unreachable at {url} (is it running? `headbench up`)"]


def test_no_stack_configured_says_what_to_do(tmp_path: Path) -> None:
    result = _run(["run"], tmp_path)
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_URI is not set and no local stack env file was found" in result.stderr


COMMANDS = ["compare", "datasets", "demo", "deploy", "down", "gc", "predict", "run", "status", "strategies", "study",
            "up"]
BENCH_COMMANDS = ["ddp-options", "lockdown", "quality"]  # `python -m bench ...`, the developer tool


@pytest.mark.parametrize("which", ["headbench", "bench"])
def test_help_on_every_command_names_its_purpose_and_every_option(which: str) -> None:
    """Each of headbench's 12 commands and the bench's 3 (a new one must be added here) has a help page with its
    summary line and every option and argument it takes, wrapped or not."""
    import typer
    from click import Command
    from typer.testing import CliRunner

    from bench.cli import app as bench_app
    from flows.cli import app as headbench_app

    app, expected = (headbench_app, COMMANDS) if which == "headbench" else (bench_app, BENCH_COMMANDS)
    commands: dict[str, Command] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert sorted(commands) == expected
    for name, command in commands.items():
        result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
        assert result.exit_code == 0, (name, result.output)
        shown = " ".join(result.output.replace("│", " ").split())  # rich's box, its line breaks
        assert f"Usage: root {name} " in shown, (name, shown[:200])
        summary = " ".join((command.help or "").split("\n\n")[0].split())
        assert summary and summary[:60] in shown, (name, summary, shown[:400])
        for param in command.params:
            if param.name == "help":
                continue
            if param.param_type_name == "option":
                assert any(opt in shown for opt in param.opts), (name, param.opts, shown)
            else:  # an argument: its name in the usage line
                assert str(param.name).lower() in shown.lower().split("[options]", 1)[1][:80], (name, shown)


# A Prefect queue service whose items take a while (as events do when the API is slow on a loaded machine),
# still holding items when the command fails.
QUEUED_AT_FAILURE = """
import asyncio
import sys
import typer
from prefect._internal.concurrency.services import QueueService
from flows.output import console_without_tracebacks, fail

class Slow(QueueService[int]):
    async def _handle(self, item: int) -> None:
        await asyncio.sleep(0.2)

console_without_tracebacks()
service = Slow.instance()
for i in range(10):
    service.send(i)
try:
    fail("boom")
except typer.Exit as exc:  # what the typer app turns into the exit status
    sys.exit(exc.exit_code)
"""


def test_the_error_line_stays_last_when_prefect_still_has_queued_items(tmp_path: Path) -> None:
    """Prefect drains its queues at interpreter exit and logs 'Still processing items' while it does: the
    CLI drains them before it prints the error, so that line comes first and the error stays the last."""
    done = subprocess.run([sys.executable, "-c", QUEUED_AT_FAILURE], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path, env=os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: boom", done.stderr[-2000:]
