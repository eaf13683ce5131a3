"""Ctrl-C still stops the process after a Ray Train or Ray Tune fit has finished in it. Called on the main
thread, both install a SIGINT handler that outlives the fit: Train's aborts the finished run's controller (which
its closure keeps alive) and swallows the Ctrl-C; Tune's sets its finished experiment's stop flag. Every fit
here runs through ``infra.processes.interrupts.fit_interruptibly``, so the next Ctrl-C is a KeyboardInterrupt."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import env_without_stack, run_together

SETUP = r'''
import json, os, signal, tempfile, time
from pathlib import Path
# Ctrl-C as at a terminal: a test runner started in the background by a shell without job control hands its
# children SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own
signal.signal(signal.SIGINT, signal.default_int_handler)
from bench.config import BenchConfig
from bench.run import bench_data
cfg = BenchConfig.tiny()
data = bench_data(cfg, Path(tempfile.mkdtemp()))
'''

CTRL_C = r'''
import ray
from ray.util.state import list_actors
alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])  # this Ray's
controllers = [a.class_name for a in alive if "Controller" in a.class_name]
try:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in whatever comes next
    time.sleep(2)
    interrupted = False
except KeyboardInterrupt:
    interrupted = True
print(json.dumps({"interrupted": interrupted, "controllers": controllers}))
'''

TRAIN = SETUP + r'''
from bench.run import ray_alone
assert ray_alone(cfg, data.train, data.val, 0) > 0  # a TorchTrainer run, as the retrain task builds it
''' + CTRL_C

TUNE = SETUP + r'''
from infra.training.cluster import init_ray
from infra.training.worker import TrainConfig
from infra.training.cluster import Resources
from models.loop import FitConfig
from infra.settings import load_settings
from infra.training.tuning import tune_lr
from models import build_model
home = Path(tempfile.mkdtemp())
init_ray(load_settings(home).model_copy(update={"ray_address": None}))
train_cfg = TrainConfig(arch="resnet18", strategy="replace-fc", num_classes=10,
                        fit=FitConfig(epochs=1, batch_size=32, lr=0.01, precise_bn_batches=0),
                        resources=Resources(workers=1, cpus_per_worker=1))
init = build_model("resnet18", 10, "replace-fc", None, seed=0).state_dict()
outcome = tune_lr(train_cfg, data.train, data.val, init, trials=2, cpus_per_trial=1, storage=(str(home / "tune"), None),
                  name="ctrl-c")
assert len(outcome.trials) == 2
''' + CTRL_C


PROBES = {"ray-train": TRAIN, "ray-tune": TUNE}


@pytest.fixture(scope="module")
def probed() -> dict[str, tuple[int, str, str]]:
    """Both probes side by side, each on a private Ray of its own process: {probe: (status, stdout, stderr)}."""
    return run_together({name: [sys.executable, "-c", code] for name, code in PROBES.items()}, env_without_stack(),
                        timeout=600)


@pytest.mark.training
@pytest.mark.parametrize("probe", PROBES)
def test_ctrl_c_after_a_finished_fit_still_interrupts(probed: dict[str, tuple[int, str, str]], probe: str) -> None:
    status, out, err = probed[probe]
    assert status == 0, out[-3000:] + err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"interrupted": True, "controllers": []}
