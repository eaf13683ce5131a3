"""Skip-if-unchanged for scheduled retraining: nothing to do when the champion was trained on the same
data (the digest of every file read) with the same training parameters."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.errors import retry_transient
from infra.tracking.runs import CHAMPION_ALIAS, alias_version
from tasks import TIMEOUT_S

DATA_DIGEST_PARAM = "data_sha256"  # the run param holding the digest of every file the run read


@dataclass(frozen=True)
class Freshness:
    unchanged: bool
    reason: str
    champion_version: str | None = None
    champion_run_id: str | None = None


@task(name="check-unchanged", timeout_seconds=TIMEOUT_S["check-unchanged"],
      retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def check_unchanged(tracking_uri: str, model_name: str, data_digest: str, training: dict[str, str]) -> Freshness:
    """Compare this run's data digest and training params (``RetrainParams.identity``) with the champion's
    logged ones; the reason names the first difference."""
    champion = alias_version(tracking_uri, model_name, CHAMPION_ALIAS)
    if champion is None or not champion.run_id:
        return Freshness(False, f"{model_name!r} has no champion yet")
    try:
        logged = MlflowClient(tracking_uri).get_run(champion.run_id).data.params
    except MlflowException:
        return Freshness(False, f"champion v{champion.version}'s run {champion.run_id} is gone")
    where = f"champion v{champion.version}"
    if logged.get(DATA_DIGEST_PARAM) != data_digest:
        was = logged.get(DATA_DIGEST_PARAM, "not recorded")
        return Freshness(False, f"training data changed since {where} (digest {was[:12]} -> {data_digest[:12]})",
                         champion.version, champion.run_id)
    for key, value in sorted(training.items()):
        if logged.get(key) != value:
            return Freshness(False, f"{key} changed since {where} ({logged.get(key)!r} -> {value!r})",
                             champion.version, champion.run_id)
    return Freshness(True, f"skipped: nothing changed (data digest {data_digest[:12]} and every training param "
                     f"equal {where}'s)", champion.version, champion.run_id)
