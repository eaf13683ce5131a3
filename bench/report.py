"""The benchmark's table, as ``python -m bench`` prints it and docs/performance.md shows it."""

from __future__ import annotations

from typing import Any

from bench import epoch_walls
from bench.config import MFU_LABELS, RESNET18_TRAIN_GFLOP_224, Figures


def table(figures: Figures) -> str:
    s, m, c = figures.summary(), figures.machine, figures.config

    def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    rows = [
        ("B1 plain PyTorch training", fmt(s["b1_plain_pytorch_img_s"], " img/s"), "baseline"),
        ("B2 headbench retrain (Ray Train + MLflow + S3)", fmt(s["b2_headbench_img_s"], " img/s"),
         f"{c['workers']} Ray Train worker(s), {c['cpus_per_worker'] or 'all'} CPU each"),
        ("B2 / B1", fmt(s["b2_over_b1"], "", 3), "goal >= 0.95"),
        ("per-epoch wall, B1 / B2", fmt(s["b1_over_b2_epoch_wall"], "", 3),
         f"goal >= 0.95: {fmt(s['b1_epoch_wall_s'], ' s', 2)} against {fmt(s['b2_epoch_wall_s'], ' s', 2)} (steps, "
         "validation, checkpoint)"),
        (f"B2 with {c['ddp_workers']} DDP workers x 1 CPU", fmt(s["b2_ddp_img_s"], " img/s"),
         f"{fmt(s['b2_ddp_over_b1'], '', 3)} of B1 (gradient all-reduce on the same cores)"),
        (f"B1-DDP: torch DDP, {c['ddp_workers']} processes x 1 thread, gloo", fmt(s["b1_ddp_img_s"], " img/s"),
         "the same loop, batch and data"),
        ("Ray Train DDP / torch DDP", fmt(s["ray_ddp_over_torch_ddp"], "", 3), "goal >= 0.95"),
        *([("Ray Train alone DDP / torch DDP", fmt(s["ray_alone_ddp_over_torch_ddp"], "", 3),
            f"{fmt(s['ray_alone_ddp_img_s'], ' img/s')}: the worker function, no servers")]
          if "ray_alone_ddp_over_torch_ddp" in s else []),
        ("flow start -> first optimizer step", fmt(s["flow_start_to_first_step_s"], " s"),
         f"goal <= 6 s (cold, starting Ray: {fmt(s['cold_flow_start_to_first_step_s'], ' s')})"),
        ("last step -> model published", fmt(s["last_step_to_published_s"], " s"), "goal <= 10 s"),
        (f"linear probe x{c['probe_epochs']} epochs, cached / uncached",
         f"{fmt(s['probe_cached_s'], ' s')} / {fmt(s['probe_uncached_s'], ' s')}",
         f"speed-up {fmt(s['probe_speedup'], 'x')} (goal >= 5x)"),
        ("data loader alone", fmt(s["loader_img_s"], " img/s", 0),
         f"{fmt(s['loader_over_training'], 'x')} training (goal >= 5x)"),
        ("peak memory per Ray worker", f"{fmt(s['worker_peak_uss_mb'], ' MB', 0)} USS",
         f"goal USS <= 1000 MB; {fmt(s['worker_peak_rss_mb'], ' MB', 0)} RSS (shared libraries included)"),
        ("peak memory of the driver", fmt(s["driver_peak_rss_mb"], " MB", 0), "RSS"),
    ]
    if "b2_sync_img_s" in s:
        rows.insert(3, ("B2 with synchronous checkpoints", fmt(s["b2_sync_img_s"], " img/s"),
                        f"per-epoch wall B1 / B2-sync {fmt(s['b1_over_b2_sync_epoch_wall'], '', 3)} "
                        f"({fmt(s['b2_sync_epoch_wall_s'], ' s', 2)}): training waits for each upload"))
    if "ray_alone_img_s" in s:
        rows.insert(1, ("Ray Train alone (private Ray, no servers)", fmt(s["ray_alone_img_s"], " img/s"),
                        f"{fmt(s['ray_alone_over_b1'], '', 3)} of B1: the worker function, checkpoints on local disk"))
    if "b1_compiled_img_s" in s:
        rows.insert(1, ("B1 with torch.compile", fmt(s["b1_compiled_img_s"], " img/s"), "option"))
    for name, label in MFU_LABELS.items():
        if f"{name}_mfu" in s:
            rows.append((f"{label} share of the bf16 FLOP limit", fmt(100 * s[f"{name}_mfu"], " %"),
                         f"{RESNET18_TRAIN_GFLOP_224} GFLOP/img at 224 px"))
    rows += [(f"  start-up: {label}", fmt(seconds, " s", 2), "") for label, seconds in
             s["startup_breakdown_s"].items()]
    rows += [(f"  run end: {label}", fmt(seconds, " s", 2), "") for label, seconds in
             s["end_breakdown_s"].items()]
    rows += [(f"  start-up CPU: {group}", fmt(seconds, " CPU-s", 2), "") for group, seconds in
             s["startup_cpu_s"].items() if seconds >= 0.005]
    rows += [(f"  B2 steady epochs: {group}", fmt(cores, " cores", 2), "") for group, cores in
             s["service_cores"].items()]
    width = max(len(r[0]) for r in rows)
    head = (f"python -m bench: {c['arch']} {c['image_size']} px, batch {c['batch_size']}, {c['train_images']} "
            f"images/epoch, median of {c['repeats']}; {m.get('cores')} cores ({m.get('cpu')}), torch "
            f"{m.get('torch')} with {m.get('torch_threads')} threads" + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    lines = [head, "-" * len(head)] + [f"{a:<{width}}  {b:>22}  {note}" for a, b, note in rows]
    return "\n".join(lines)




def table_cell(column: str, value: Any) -> str:
    """Counts as integers, seconds and rates with one decimal, accuracies, losses and ratios with four."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if column == "cores":
        return f"{value:.2f}"
    if column.endswith(" s") or any(key in column for key in ("second", "img/s", "wall")):
        return f"{value:.1f}"
    if value.is_integer() and abs(value) >= 100:
        return str(int(value))
    return f"{value:.4f}"


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_cell(h, r.get(h, "")) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def epoch_table(history: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Per epoch: the steps, validation (precise BN + val), the rest of the wall time, the wall time."""
    walls = epoch_walls(history)
    rows = []
    for i, row in enumerate(history):
        steps, validation = row["epoch_seconds"], row.get("eval_seconds", float("nan"))
        wall = walls[i] if i < len(walls) else None
        # two clocks (the loop's steps timer, the step marks) differ by hundredths of a second either way;
        # + 0.0 prints a rounded -0.0 as 0.0
        rest = "-" if wall is None else round(wall - steps - validation, 1) + 0.0
        rows.append({"epoch": int(row["epoch"]), "img/s (steps)": row["images_per_second"], "steps s": steps,
                     "validation s": validation,
                     "checkpoint, report and rest s": rest,
                     "wall s": "-" if wall is None else wall})
    return rows
