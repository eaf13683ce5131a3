"""The Ray Train worker: what runs inside each of the N data-parallel worker processes.

Kept apart from the driver (``infra/training/trainer.py``) and the Prefect task (``tasks/train.py``) so a
worker imports only torch, ray.train, torchvision and ``models`` (plus the small ``infra.tracking.epochs`` and
``infra.processes.supervise``): every import here is resident memory in every worker. ``preload`` does these imports as
the process starts (``infra/training/prestart.py``).
MLflow's per-epoch logging happens in Train's controller (``infra/training/epoch_log.py``), from what rank 0
reports. The loop itself is ``models.loop.fit``, the same function a plain script calls; Ray appears only in
the hooks: rank and world size, ``prepare_model`` (DDP), ``prepare_data_loader`` (device moves; ``fit``
brings its own seeded sampler), ``report`` and the checkpoints (the shape of Ray's Fashion-MNIST Train
example).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from infra.processes.supervise import process_started_at
from infra.tracking.epochs import HISTORY_KEY, epoch_line
from infra.training.cluster import Resources
from models import build_model, parse_strategy
from models.loop import DDP_OPTIONS, EpochEnd, FitConfig, FitHooks, FitState, fit
from models.options import option
from models.weights import WEIGHTS_FILE, headbench_keys, save_state_dict

TRAIN_STATE = "train_state.pt"
BEST_WEIGHTS_FILE = "best.safetensors"


CHECKPOINT_UPLOADS = ("async", "sync")


@dataclass(frozen=True)
class Checkpoints:
    """How often the worker checkpoints, and whether training waits for the upload (user options)."""

    checkpoint_every: int = option(1, "checkpoint to S3 every N epochs (and after the last): a resume restarts "
                                   "from the last checkpoint taken, and MLflow gets the epochs at each "
                                   "checkpoint", ge=1, le=1000)
    checkpoint_upload: str = option("async", "async: training goes on while Ray uploads the checkpoint (the "
                                    "epoch is logged once it is stored); sync: training waits for the upload",
                                    choices=CHECKPOINT_UPLOADS)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Compute:
    """How each worker computes (user options): autocast precision and torch.compile."""

    precision: str = option("auto", "autocast precision of the steps: auto (bf16 on a GPU that supports it, "
                            "fp32 on CPU), bf16, fp16 (GPU only; with loss scaling) or fp32", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model in each worker (compiled once per run and phase: "
                           "pays off on a GPU over many steps; on a CPU the compile costs more than a short run "
                           "gains)")

    def autocast_dtype(self, on_gpu: bool) -> torch.dtype | None:
        if self.precision == "auto":
            return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else None
        return AUTOCAST[self.precision]


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run on Ray Train: the model to build, the loop's recipe and the resources. Composed from
    the declarations (``FitConfig``, ``HeadConfig``'s options, ``Resources``), never copied field by field."""

    arch: str
    strategy: str
    num_classes: int
    fit: FitConfig  # fit.batch_size is global: each of N workers takes batch_size // N
    resources: Resources = field(default_factory=Resources)
    head: dict[str, Any] = field(default_factory=dict)  # HeadConfig's options: hidden_dim, dropout
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    compute: Compute = field(default_factory=Compute)
    max_failures: int = 2  # worker failures Train recovers from (restart from the last checkpoint)

    def __post_init__(self) -> None:  # the loop's schedule is the strategy's: "mlp+lp-ft" trains as "lp-ft"
        object.__setattr__(self, "fit", replace(self.fit, schedule=parse_strategy(self.strategy).schedule))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of ``dataclasses.asdict`` (how the config travels in Ray's ``train_loop_config``)."""
        return cls(**(values | {"fit": FitConfig(**values["fit"]), "resources": Resources(**values["resources"]),
                                "checkpoints": Checkpoints(**values["checkpoints"]),
                                "compute": Compute(**values["compute"])}))

    def with_fit(self, **changes: Any) -> TrainConfig:
        """This config with some of the loop's recipe changed (a tuned lr, a child's seed)."""
        return replace(self, fit=replace(self.fit, **changes))


def save_checkpoint(end: EpochEnd, directory: Path) -> None:
    """Weights (safetensors), best weights when early stopping keeps them, and the rest of the state."""
    save_state_dict(end.model, directory / WEIGHTS_FILE)
    if end.state.best_weights is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in end.state.best_weights.items()}, str(directory / BEST_WEIGHTS_FILE))
    torch.save(end.state.train_state(), directory / TRAIN_STATE)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], FitState]:
    """(weights, fit state) of a checkpoint directory; never unpickles (safetensors + weights_only)."""
    from safetensors.torch import load_file

    best = load_file(directory / BEST_WEIGHTS_FILE) if (directory / BEST_WEIGHTS_FILE).exists() else None
    saved = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    # replace-fc weights are saved under torchvision's names (see models.weights.publishable_state_dict)
    return headbench_keys(load_file(directory / WEIGHTS_FILE)), FitState.from_train_state(saved, best)


class StepClock:
    """Wall clock (``time.time()``) of each epoch's first and last optimizer step. The bench's start-up and
    end-of-run breakdown reads them from the history rows (they are not MLflow metrics: ``NOT_METRICS``)."""

    def __init__(self) -> None:
        self.first = self.last = 0.0

    def tick(self) -> None:  # FitHooks.on_step: after every optimizer step
        self.last = time.time()
        if not self.first:
            self.first = self.last

    def lap(self) -> dict[str, float]:
        """This epoch's marks; the next tick starts the next epoch's."""
        marks = {"first_step_at": self.first, "last_step_at": self.last}
        self.first = 0.0
        return marks


_preloaded_at: float | None = None  # when ``preload`` finished in this process


def preload() -> None:
    """Ray's worker-process setup hook for Train's workers (``infra.training.prestart``): run when the process starts,
    before it takes its actor, so that a prestarted process has done every import the worker will need
    (importing this module brought torch and ``models``). Imports only: none of them asks CUDA for its devices,
    which a GPU worker may do only once Ray has set CUDA_VISIBLE_DEVICES for its actor."""
    global _preloaded_at
    import ray.train.torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first optimizer imports it: torch wraps ``add_param_group`` in it)
    import torchvision  # noqa: F401  (models.net builds the trunk with it)

    _preloaded_at = time.time()


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: ``fit`` with Ray's rank, DDP, reports and per-epoch checkpoints."""
    entered_at = time.time()
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])  # never above this worker's CPU share (it halves speed)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    train_split, val_split = ray.get(config["data_ref"])  # zero-copy numpy views from the object store
    model = build_model(cfg.arch, cfg.num_classes, cfg.strategy, None, **cfg.head)
    model.load_state_dict(ray.get(config["init_ref"]))
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a worker failure: weights, optimizer, schedule, history
        with checkpoint.as_directory() as ckpt_dir:
            weights, resume = load_checkpoint(Path(ckpt_dir))
        model.load_state_dict(weights)
    model.to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    # when this worker process started, imported, entered this function and was ready to train: the bench's start-up
    # breakdown reads them from the first epoch's row (not MLflow metrics)
    startup = {"worker_started_at": process_started_at(), "worker_preloaded_at": _preloaded_at or entered_at,
               "worker_entered_at": entered_at, "worker_ready_at": time.time()}

    clock = StepClock()

    def on_epoch(end: EpochEnd) -> None:
        end.row.update(clock.lap())
        if startup:
            end.row.update(startup)
            startup.clear()
        if rank != 0:
            ray.train.report(end.row, checkpoint=None)
            return
        # Ray's worker log (--verbose)
        epoch = int(end.row["epoch"])
        print(epoch_line(epoch, cfg.fit.epochs, end.phase.name, end.row), flush=True)
        if not (end.final or epoch % cfg.checkpoints.checkpoint_every == 0):
            ray.train.report(end.row, checkpoint=None)  # no history: MLflow gets this epoch with the next checkpoint
            return
        folder = tempfile.mkdtemp(prefix="headbench-checkpoint-")  # Ray deletes it once uploaded
        save_checkpoint(end, Path(folder))
        # the whole history: Train's controller logs to MLflow whatever epochs it does not have yet, once this
        # checkpoint is stored (async: while the next epoch trains). Named by epoch, so a worker group restarted
        # during an upload writes that epoch's folder again instead of leaving a second one.
        ray.train.report(end.row | {HISTORY_KEY: end.state.history},
                         checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode[cfg.checkpoints.checkpoint_upload.upper()],
                         delete_local_checkpoint_after_upload=True)

    def wrap_model(module: torch.nn.Module) -> torch.nn.Module:
        wrapped = ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy_kwargs=DDP_OPTIONS)
        return torch.compile(wrapped) if cfg.compute.compile else wrapped  # DDP first, then compile: torch's order

    hooks = FitHooks(
        rank=rank, world=world, device=device, on_epoch=on_epoch, on_step=clock.tick, resume=resume,
        wrap_model=wrap_model,
        wrap_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        autocast_dtype=cfg.compute.autocast_dtype(on_gpu), channels_last=on_gpu, pin_memory=on_gpu)
    fit(model, cfg.fit, train_split, val_split, hooks)
