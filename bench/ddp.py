"""B1-DDP: plain torch DistributedDataParallel, the baseline Ray Train's data parallelism is judged against.

``world`` processes started with ``torch.multiprocessing`` (spawn), each with one intra-op thread, a gloo
process group on 127.0.0.1, and the same loop the Ray Train workers run (``models.loop.fit`` with its rank,
world size and a DDP wrapper built with ``models.loop.DDP_OPTIONS`` unless told otherwise): the same
model, global batch, data, seed and epochs as B2's DDP row.
"""

from __future__ import annotations

import os
from typing import Any

from bench import steady_img_s
from infra.processes.supervise import HOST, free_port


def _worker(rank: int, world: int, port: int, job: dict[str, Any], results: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from models import build_model
    from models.loop import FitConfig, FitHooks, fit

    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port))
    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(job["arch"], 10, "replace-fc", None, seed=0)
        hooks = FitHooks(rank=rank, world=world,
                         wrap_model=lambda m: DistributedDataParallel(m, **job["ddp_options"]))
        cfg = FitConfig(epochs=job["epochs"], batch_size=job["batch_size"], lr=0.01, precise_bn_batches=0)  # global
        result = fit(model, cfg, job["train"], job["val"], hooks)
        if rank == 0:
            results.put(steady_img_s(result.history))
    finally:
        dist.destroy_process_group()


def b1_ddp(arch: str, batch_size: int, epochs: int, train: Any, val: Any, *, world: int = 2, threads: int = 1,
           ddp_options: dict[str, Any] | None = None) -> float:
    """Steady img/s (median over epochs 2..) of ``world`` torch DDP processes x ``threads`` threads."""
    import torch.multiprocessing as mp

    from models.loop import DDP_OPTIONS

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    job = {"arch": arch, "batch_size": batch_size, "epochs": epochs, "train": train, "val": val,
           "threads": threads, "ddp_options": DDP_OPTIONS if ddp_options is None else ddp_options}
    mp.start_processes(_worker, args=(world, free_port(), job, results), nprocs=world, join=True,
                       start_method="spawn")
    return float(results.get())


# What `python -m bench ddp-options` tries, against plain DDP: the knobs that matter for gloo on CPU
DDP_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {}, "gradient_as_bucket_view": {"gradient_as_bucket_view": True}, "static_graph": {"static_graph": True},
    "bucket_view + static_graph": {"gradient_as_bucket_view": True, "static_graph": True},
    "one 100 MB bucket": {"bucket_cap_mb": 100}, "5 MB buckets": {"bucket_cap_mb": 5},
}


def compare_options(arch: str, batch_size: int, epochs: int, train: Any, val: Any, repeats: int,
                    log: Any = print) -> dict[str, list[float]]:
    """B1-DDP under each of DDP_VARIANTS, interleaved ``repeats`` times (so drift hits every variant alike)."""
    rates: dict[str, list[float]] = {name: [] for name in DDP_VARIANTS}
    for i in range(repeats):
        for name, options in DDP_VARIANTS.items():
            rates[name].append(b1_ddp(arch, batch_size, epochs, train, val, ddp_options=options))
            log(f"[{i + 1}/{repeats}] torch DDP 2 x 1, {name}: {rates[name][-1]:.1f} img/s")
    return rates
