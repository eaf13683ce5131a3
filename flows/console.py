"""The live progress display of `headbench run`, `compare` and `demo`: the flow's stage, then one bar per
training run (the retrain run, or each running child of a comparison) with its loss, accuracy and ETA.

Progress is read from MLflow (``infra.tracking.progress``), where Train's controller logs every epoch; none of Ray's
worker output is needed on the terminal (`--verbose` forwards it). On a terminal the display redraws in place; in
a pipe or a log file it prints one line per stage and per epoch instead.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flows.stages import STAGES
from infra.data.download import DownloadProgress, every
from infra.tracking.progress import ProgressReader, RunProgress
from infra.uris import public_name

POLL_S = 2.0  # each poll is a few MLflow queries; on a small machine the training shares the cores with them
LABEL_WIDTH = 26  # "replace-fc+lp-ft seed 12" fits; the bar and metrics take the rest of 80 columns


def _short(text: str, width: int = LABEL_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


class LiveProgress:
    """``with LiveProgress(console, tracking_uri, experiment) as live: ... live.on_stage(name) ...``"""

    def __init__(self, console: Console, tracking_uri: str | None, experiment: str) -> None:
        self.console, self.tracking_uri, self.experiment = console, tracking_uri, experiment
        self.interactive = console.is_terminal
        # markup off: labels and lines carry user text (strategy names, '[finetune]') that must print as it is
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=16),
                                 TextColumn("{task.fields[count]}"), TextColumn("{task.fields[metrics]}", markup=False),
                                 TimeRemainingColumn(compact=True),
                                 console=console, transient=False, disable=not self.interactive)
        self.stage_task: TaskID | None = None
        self.rows: dict[str, TaskID] = {}
        self.printed: dict[str, int] = {}  # epochs already printed per run (non-interactive)
        self.reader: ProgressReader | None = None
        self.downloads: dict[str, TaskID] = {}  # URL -> its bar
        self._download_lines = every(5.0, lambda line: self.console.print(line, highlight=False, markup=False))
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        self.stage_task = self.progress.add_task(_short("starting"), total=len(STAGES) - 1, metrics="",
                                                 count=f"0/{len(STAGES) - 1}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if kind is None:
            self.refresh()
        self.progress.stop()

    def on_stage(self, name: str) -> None:
        """A flow listener (``flows.stages.listening``): called in the flow run's own context."""
        if self.stage_task is not None:
            self.progress.update(self.stage_task, description=_short(f"stage: {name}"), completed=STAGES.index(name),
                                 count=f"{STAGES.index(name)}/{len(STAGES) - 1}")
        if not self.interactive:
            self.console.print(f"[{time.monotonic() - self.started:6.1f} s] {name}", highlight=False, markup=False)
        if name in ("tune", "train") and self.reader is None and self.tracking_uri:
            from prefect.runtime import flow_run

            flow_run_id = flow_run.get_id()
            if flow_run_id:
                self.reader = ProgressReader(self.tracking_uri, self.experiment, str(flow_run_id))
                # Epochs MLflow holds before this attempt trains (a resumed run's) are not this attempt's:
                # they start the bar, and are not printed again.
                self.printed = {run.run_id: run.epoch for run in self.reader.read()}
                self._thread = threading.Thread(target=self._poll, name="headbench-progress", daemon=True)
                self._thread.start()

    def on_download(self, note: DownloadProgress) -> None:
        """A download listener (``infra.data.download.watching``): a bar per file (bytes, rate, ETA) on a terminal,
        a line every 5 s and at the end in a pipe."""
        if not self.interactive:
            self._download_lines(note)
            return
        name = _short("download " + public_name(note.url))
        percent = f"{100 * note.done / note.total:.0f}%" if note.total else f"{note.done / 1e6:.1f} MB"
        metrics = note.line().split(": ", 1)[-1]
        if note.url not in self.downloads:
            self.downloads[note.url] = self.progress.add_task(name, total=note.total, metrics=metrics, count=percent)
        self.progress.update(self.downloads[note.url], completed=note.done, total=note.total, metrics=metrics,
                             count=percent)

    def _poll(self) -> None:
        while not self._done.wait(POLL_S):
            self.refresh()

    def refresh(self) -> None:
        if self.reader is None:
            return
        with self._lock:
            runs = self.reader.read()
            many = len(runs) > 1
            for run in runs:
                self._show(run, many)

    def _show(self, run: RunProgress, many: bool) -> None:
        m = run.metrics
        metrics = (f"loss {m['train_loss']:.3f} acc {m.get('val_accuracy', 0):.3f}" if "train_loss" in m else
                   ("done" if run.finished else "starting"))
        if run.status in ("FAILED", "KILLED"):
            metrics = run.status.lower()
        count = f"{run.epoch}/{run.epochs}" if run.epochs else str(run.epoch)
        if run.run_id not in self.rows:
            self.rows[run.run_id] = self.progress.add_task(_short(run.label), total=run.epochs or None,
                                                           metrics=metrics, count=count)
        self.progress.update(self.rows[run.run_id], completed=run.epoch, total=run.epochs or None, metrics=metrics,
                             count=count)
        if not self.interactive and run.epoch > self.printed.get(run.run_id, 0) and self.reader is not None:
            prefix = f"{run.label}: " if many else ""
            for epoch, line in self.reader.epochs_after(run.run_id, self.printed.get(run.run_id, 0)):
                self.console.print(prefix + line, highlight=False, soft_wrap=True, markup=False)
                self.printed[run.run_id] = epoch


# The comparison table on a terminal: the strategy column first and never cut short while names fit, then as
# many of these columns as the width holds (MLflow and the Prefect artifact keep the full table).
TABLE_PRIORITY = ("test acc [95% CI]", "vs winner [paired 95% CI]", "runs", "train s", "macro-F1 [95% CI]",
                  "img/s", "lr", "trainable params")
COLUMN_GAP = 2


def shortest_unambiguous(names: list[str]) -> int:
    """The smallest width at which names cut to it (with '…') still tell every name apart."""
    longest = max((len(n) for n in names), default=1)
    for width in range(4, longest + 1):
        cut = [n if len(n) <= width else n[:width - 1] + "…" for n in names]
        if len(set(cut)) == len(names):
            return width
    return longest


def comparison_table(records: list[dict[str, object]], width: int) -> Table:
    """The rows of ``tasks.compare.table_records`` as a table at most ``width`` columns wide."""
    names = [str(r["strategy"]) for r in records]
    name_width = max(len("strategy"), *(len(n) for n in names))
    chosen: list[str] = []
    used = name_width
    for column in TABLE_PRIORITY:
        if column not in records[0]:
            continue
        need = COLUMN_GAP + max(len(column), *(len(str(r[column])) for r in records))
        if used + need > width:
            break  # in priority order: a column never shows when a more important one could not
        chosen.append(column)
        used += need
    if not chosen or used > width:  # too narrow even for one metric: cut names, never below unambiguous
        first = TABLE_PRIORITY[0]
        metric = COLUMN_GAP + max(len(first), *(len(str(r[first])) for r in records))
        name_width = max(shortest_unambiguous(names), width - metric)
        chosen = [first]
    table = Table(box=None, pad_edge=False, padding=(0, COLUMN_GAP // 2), title="head strategies (best first)",
                  title_justify="left", show_edge=False)
    table.add_column(Text("strategy"), no_wrap=True, max_width=name_width, overflow="ellipsis")
    for column in chosen:
        table.add_column(Text(column), no_wrap=True, justify="right" if column not in ("runs",) else "center")
    for record in records:
        table.add_row(Text(str(record["strategy"])), *(Text(str(record[c])) for c in chosen))
    return table
