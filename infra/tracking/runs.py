"""MLflow helpers: one client per process, addressed by run id (safe to use from Ray Train's controller).

No fluent ``mlflow.start_run`` state: every call names its run, so nothing opens or ends runs behind
our back, and Ray Train's controller can log to the driver's run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.errors import HeadbenchError
from infra.processes.interrupts import INTERRUPTED, is_interrupt

CHAMPION_ALIAS = "champion"  # the registry alias that names the model in service; promotion moves it
MAX_PARAM_LEN = 6000
# logged-model tags (and MLmodel metadata) naming the S3 publication a logged model was made from
S3_URI_KEY, SHA256_KEY = "headbench.s3_uri", "headbench.sha256"


class TrackingError(HeadbenchError):
    pass


MAX_KEY_LEN = 250  # MLflow's limit on metric, param and tag keys
CLASS_KEY_LEN = 64  # room for prefixes such as 'test_precision_'


def metric_key(name: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . / space``; class names like 'T-shirt/top' are made safe."""
    return re.sub(r"[^0-9A-Za-z_\-. ]", "_", name).strip().replace(" ", "_")


def class_metric_keys(names: list[str]) -> list[str]:
    """One valid, unique metric key per class name, the same for a name in every run.

    A name that is already a clean key stays as it is ('Trouser'); any other one ('T-shirt/top', '猫',
    a 300-character name) becomes its cleaned, shortened form plus 8 hex digits of its sha256, so names
    that clean to the same text ('猫' and '犬' both to '_') never collide."""
    import hashlib

    keys = []
    for name in names:
        clean = metric_key(name)
        if clean != name or len(clean) > CLASS_KEY_LEN or not clean:
            tag = hashlib.sha256(name.encode()).hexdigest()[:8]
            clean = f"{clean[:CLASS_KEY_LEN - 9]}-{tag}".lstrip("-") if clean.strip("_") else f"class-{tag}"
        keys.append(clean)
    if len(set(keys)) != len(keys):  # only identical names collide: the class list itself repeats a name
        raise TrackingError(f"class names are not unique: {sorted({n for n in names if names.count(n) > 1})}")
    return keys


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dict -> dotted keys, for MLflow params ({'data': {'seed': 0}} -> {'data.seed': 0})."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


class Tracker:
    """Thin wrapper around MlflowClient bound to one run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @contextmanager
    def lifecycle(self) -> Iterator[Tracker]:
        """FINISHED when the block completes, FAILED when it raises, KILLED when it was interrupted (Ctrl-C,
        SIGTERM, or any error once ``infra.processes.interrupts.interrupt()`` ran); the block's own error is
        what propagates, even when MLflow cannot be reached to record the failure."""
        try:
            yield self
        except BaseException as exc:
            with suppress(Exception):  # KILLED: interrupted (Ctrl-C, SIGTERM), not broken
                self.end("KILLED" if is_interrupt(exc) or INTERRUPTED.is_set() else "FAILED")
            raise
        self.end("FINISHED")


# MLflow's UI opens an experiment in its GenAI layout (traces, judges; runs under "Evaluation runs") unless this
# tag names another kind; this is the value MLflow's own UI sets for model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing, tagged as a model-training experiment. Two runs that
    start together on a new server may both find it missing: the one whose create loses the race reads the
    winner's."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if not any(key in exp.tags for key in EXPERIMENT_KIND):  # a kind a user chose stays
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or not (exp := client.get_experiment_by_name(name)):
            raise
        return exp.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> Tracker:
    client = MlflowClient(tracking_uri)
    try:
        exp_id = experiment_id(client, experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {tracking_uri} failed to start a run: {exc.message.splitlines()[0]}"
                            ) from None
    return Tracker(tracking_uri, run.info.run_id)


def reopen_run(tracking_uri: str, run_id: str, expected_params: Mapping[str, str]) -> Tracker:
    """Reopen an unfinished run to continue it; its logged params must equal ``expected_params``."""
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"--resume-run-id {run_id}: no such MLflow run at {tracking_uri}") from None
    if run.info.status == "FINISHED":
        raise TrackingError(f"--resume-run-id {run_id}: that run already finished; nothing to resume")
    for key, value in expected_params.items():
        logged = run.data.params.get(key)
        if logged is not None and logged != value:
            raise TrackingError(f"--resume-run-id {run_id} was run with {key}={logged!r}, this run has "
                                f"{value!r}; a resume needs the same parameters")
    client.update_run(run_id, status="RUNNING")
    return Tracker(tracking_uri, run_id)


def run_children(tracking_uri: str, parent_run_id: str) -> dict[str, list[str]]:
    """Child run ids of a parent run, grouped by their ``strategy`` tag."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=1000)
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("strategy", ""), []).append(run.info.run_id)
    return out


# MLflow's UI lays every page out for GenAI (traces, judges, "Evaluation runs") unless the browser remembers the
# other choice; its `workflowType` URL parameter picks the model-training layout for the page a link opens.
MODEL_TRAINING_UI = "workflowType=machine_learning"


def run_url(tracking_uri: str, run_id: str) -> str:
    """The MLflow UI page of a run, in the model-training layout."""
    run = MlflowClient(tracking_uri).get_run(run_id)
    return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}?{MODEL_TRAINING_UI}"


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model ``name`` unless it exists. Two first runs of a new name may both find it
    missing: the one whose create loses gets RESOURCE_ALREADY_EXISTS, which means what it wanted is there."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description="headbench fine-tuned ResNet classifiers")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_version(tracking_uri: str, name: str, source: str, run_id: str,
                     tags: Mapping[str, str] | None = None, description: str | None = None,
                     model_id: str | None = None) -> str:
    """Create the registered model if needed, then a new version pointing at ``source`` (the logged
    model's ``models:/<model id>``); returns it."""
    client = MlflowClient(tracking_uri)
    ensure_registered_model(client, name)
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if existing.source == source:  # a retry after registering: one version per published model
            return str(existing.version)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags or {}),
                                          description=description, model_id=model_id)
    return str(version.version)


def describe_version(tracking_uri: str, name: str, version: str, description: str) -> None:
    """Set the registered version's description (the MLflow UI shows it as the version's model card)."""
    MlflowClient(tracking_uri).update_model_version(name, version, description=description)


def publication_uri(client: MlflowClient, source: str) -> str:
    """A registry version's source -> its S3 publication: a ``models:/<model id>`` source through the
    logged model's tag; an ``s3://`` source as it is."""
    if source.startswith("s3://"):
        return source
    try:
        uri = client.get_logged_model(source.removeprefix("models:/")).tags.get(S3_URI_KEY)
    except MlflowException as exc:
        raise TrackingError(f"logged model {source} not found: {exc.message.splitlines()[0]}") from None
    if not uri:
        raise TrackingError(f"logged model {source} has no {S3_URI_KEY} tag: not a headbench publication")
    return str(uri)


def resolve_registered(tracking_uri: str, uri: str) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> the S3 publication of that version."""
    rest = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri)
    if "@" not in rest and "/" not in rest:  # models:/<model id>: a logged model, registered or not
        return publication_uri(client, uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise TrackingError(f"registered model {uri!r} not found at {tracking_uri}: "
                            f"{exc.message.splitlines()[0]}") from None
    return publication_uri(client, version.source)


def alias_version(tracking_uri: str, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points at, or None when the model or the alias does not exist yet."""
    try:
        return MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"MLflow at {tracking_uri} failed to read alias {name}@{alias}: "
                            f"{exc.message.splitlines()[0]}") from None


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)


def set_version_tags(tracking_uri: str, name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
