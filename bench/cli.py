"""`python -m bench` (also `make bench`): the pipeline benchmark, and `bench quality`, the quality
benchmark. Typer options; the work is in ``bench.run`` and ``bench.quality``, imported when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks: the pipeline against plain PyTorch (speed, overheads, memory; `make bench`), "
                       "and `quality` (accuracy against a plain script, the demo comparison; `make quality`).",
                  add_completion=False)

HomeOpt = Annotated[Path | None, typer.Option(help="use the local stack at this HEADBENCH_HOME if it is up "
                                                   "[default: $HEADBENCH_HOME, else a private stack]")]


@app.callback(invoke_without_command=True)
def speed(ctx: typer.Context,
          tiny: Annotated[bool, typer.Option(help="a seconds-long setting (tests)")] = False,
          gpu: Annotated[bool, typer.Option(help="one GPU, 224 px, bf16 autocast, channels_last")] = False,
          compile: Annotated[bool, typer.Option(help="also time B1 with torch.compile")] = False,
          b1_only: Annotated[bool, typer.Option(help="only the plain PyTorch figure (no stack, no Ray)")] = False,
          b2_only: Annotated[bool, typer.Option(help="B1 and B2 alone (no loader, probe or DDP rows): to measure "
                                                     "a knob given with --env")] = False,
          ray_alone: Annotated[bool, typer.Option(help="also the Ray Train worker function on a private Ray with "
                                                       "no servers (with --b1-only: a GPU box with PyTorch + Ray)")
                               ] = False,
          env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE set before the stack and Ray start, e.g. "
                                                            "RAY_worker_niceness=15 (repeatable)")] = None,
          repeats: Annotated[int | None, typer.Option(min=1, max=20, help="runs per figure (median)")] = None,
          workers: Annotated[int | None, typer.Option(min=1, max=64, help="Ray Train workers of B2")] = None,
          image_size: Annotated[int | None, typer.Option(min=16, max=512, help="image side in pixels")] = None,
          home: HomeOpt = None,
          json: Annotated[Path, typer.Option(help="where to write the figures")] = Path("bench/results.json"),
          ) -> None:
    """The pipeline benchmark: B1 (the training loop alone) against B2 (the retrain flow), fixed overheads,
    the probe cache, the loader and worker memory (docs/performance.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from bench.run import main

    pairs = []
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item[:80]!r}: expected KEY=VALUE", param_hint="--env")
        pairs.append((key.strip(), value))
    raise typer.Exit(main(tiny=tiny, gpu=gpu, compile=compile, b1_only=b1_only, b2_only=b2_only, ray_alone=ray_alone,
                          env=tuple(pairs), repeats=repeats, workers=workers, image_size=image_size, home=home,
                          json_path=json))


@app.command("ddp-options")
def ddp_options(repeats: Annotated[int, typer.Option(min=1, max=20, help="runs per option set")] = 3,
                home: HomeOpt = None,
                json: Annotated[Path, typer.Option(help="where to write the rates")] = Path("bench/ddp.json"),
                ) -> None:
    """Torch DDP (2 processes x 1 thread, gloo) under each DistributedDataParallel option set, interleaved."""
    from bench.run import ddp_options_main

    raise typer.Exit(ddp_options_main(repeats, home, json))


@app.command()
def quality(tiny: Annotated[bool, typer.Option(help="a seconds-long setting (tests): 600 images, 1 epoch")] = False,
            epochs: Annotated[int | None, typer.Option(min=1, max=100, help="epochs of the (a)/(b) recipe")] = None,
            no_demo: Annotated[bool, typer.Option(help="skip (c); keep its figures from --json if there")] = False,
            no_best: Annotated[bool, typer.Option(help="skip (b); keep its figures from --json if there")] = False,
            demo_only: Annotated[bool, typer.Option(help="only (c); keep the figures of (a) and (b) from --json "
                                                         "if there")] = False,
            home: HomeOpt = None,
            json: Annotated[Path, typer.Option(help="where the figures are kept")] = Path("bench/quality.json"),
            doc: Annotated[Path, typer.Option(help="where to write the report")] = Path("docs/quality.md"),
            report_only: Annotated[bool, typer.Option(help="rewrite --doc from the figures in --json, running "
                                                           "nothing")] = False) -> None:
    """The quality benchmark: the retrain flow against a plain script, the recipe's accuracy and wall time, and
    the demo comparison with each two-phase schedule against its probe (docs/quality.md)."""
    from bench.quality import QualityArgs, main

    raise typer.Exit(main(QualityArgs(tiny=tiny, epochs=epochs, no_demo=no_demo, no_best=no_best,
                                      demo_only=demo_only, home=home, json=json, doc=doc, report_only=report_only)))


@app.command()
def lockdown(repeats: Annotated[int, typer.Option(min=1, max=1000, help="tries per figure (median)")] = 20,
             home: HomeOpt = None) -> None:
    """How long each refusal of docs/reliability.md's *Attacks tried* takes (hostile archives and downloads,
    each service asked without the stack's credentials), and what MLflow's login costs a request."""
    from bench.lockdown import main

    raise typer.Exit(main(repeats, home))
