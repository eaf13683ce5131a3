"""Champion/challenger promotion: the registry alias ``champion`` moves to a new version only when the
policy says so, judged on the challenger's own test split, with a compare-and-set on the alias.

Test data: the champion is always scored again on the challenger's test split, so both numbers come from
the same examples (one test digest). When the champion's own test split had another digest (the data
changed, or another subset or size), the decision records "incomparable: different test data" and the
rule is that re-scoring: a champion that trained on some of the new test images can only look better for
it, so a promotion is never easier than it should be.

A champion that cannot be loaded (its manifest or weights missing from S3, a sha256 mismatch, weights
that do not load) would otherwise block every later promotion: it is "unusable", the decision promotes
the challenger under ``if-better`` (a model that loads beats one that does not) and records why in the
``promotion_reason`` and ``champion_unusable`` tags. An S3 endpoint that is down is not that: the task
fails (and retries) without deciding.

Order of writes, each only after the previous one succeeded: alias -> ``champion.json`` in S3 -> version and
run tags. A reader of the pointer never sees a model the alias has not reached; a retry of the task after
the alias moved finishes the pointer instead of deciding again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.errors import HeadbenchError, is_transient, retry_transient
from infra.publishing.load import load_published
from infra.publishing.store import ModelStore
from infra.settings import Settings
from infra.storage.s3 import s3_client
from infra.tracking.runs import CHAMPION_ALIAS, Tracker, alias_version, set_alias, set_version_tags
from models.data import ArraySplit, resize_uint8
from tasks import TIMEOUT_S
from tasks.evaluate import evaluate_split
from tasks.publish import Publication

PROMOTED, REJECTED, SKIPPED = "champion", "challenger-rejected", "not-promoted"
CAS_ATTEMPTS = 5  # re-decide this many times when another run moved the alias under us
INCOMPARABLE_TEST_DATA = "incomparable: different test data"


@dataclass(frozen=True)
class PromotionPolicy:
    mode: str = "if-better"  # never | if-better | always
    metric: str = "test_accuracy"
    min_margin: float = 0.0


@dataclass(frozen=True)
class Decision:
    outcome: str  # champion | challenger-rejected | not-promoted
    reason: str
    metric: str
    challenger_version: str
    challenger_score: float
    champion_version: str | None = None  # the champion this run was compared with
    champion_score: float | None = None  # that champion, scored on this run's test split
    test_data: str = ""  # whether the champion's own test split was this run's ("same") or not
    champion_unusable: str = ""  # why the champion could not be loaded at all

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED

    def as_tags(self) -> dict[str, str]:
        tags = {"promotion": self.outcome, "promotion_reason": self.reason, "promotion_metric": self.metric,
                "challenger_score": f"{self.challenger_score:.6f}"}
        if self.champion_version is not None:
            tags["champion_version"] = self.champion_version
        if self.champion_score is not None:
            tags["champion_score"] = f"{self.champion_score:.6f}"
        if self.test_data:
            tags["promotion_test_data"] = self.test_data
        if self.champion_unusable:
            tags["champion_unusable"] = self.champion_unusable
        return tags


def decide(policy: PromotionPolicy, version: str, score: float, champion_version: str | None,
           champion_score: float | None, incomparable: str | None = None, test_data: str = "",
           unusable: str | None = None) -> Decision:
    """The promotion rule, pure: first model -> champion; if-better needs score > champion + min_margin,
    both scored on this run's test split (``test_data`` says whether the champion's own split was it);
    a champion that cannot be loaded (``unusable``) is replaced."""
    def make(outcome: str, reason: str) -> Decision:
        if test_data.startswith(INCOMPARABLE_TEST_DATA) and champion_score is not None:
            reason = f"{reason}; {test_data}"
        return Decision(outcome, reason, policy.metric, version, score, champion_version, champion_score,
                        test_data, unusable or "")

    if policy.mode == "never":
        return make(SKIPPED, "promotion disabled (promote=never)")
    if champion_version is None:
        return make(PROMOTED, "first model of this name")
    if policy.mode == "always":
        return make(PROMOTED, f"promote=always (replaces v{champion_version})")
    if unusable:
        return make(PROMOTED, f"champion v{champion_version} is unusable ({unusable}); replaced by a model "
                              "that loads")
    if incomparable or champion_score is None:
        return make(REJECTED, incomparable or "the champion could not be scored")
    if score > champion_score + policy.min_margin:
        return make(PROMOTED, f"{policy.metric} {score:.4f} > champion v{champion_version} "
                              f"{champion_score:.4f} + margin {policy.min_margin:g}")
    return make(REJECTED, f"{policy.metric} {score:.4f} <= champion v{champion_version} {champion_score:.4f} "
                          f"+ margin {policy.min_margin:g}")


@dataclass(frozen=True)
class ChampionScore:
    score: float | None  # on this run's test split; None when it cannot be compared at all
    incomparable: str | None = None  # why there is no score
    test_data: str = "same"  # "same", or INCOMPARABLE_TEST_DATA with both digests
    unusable: str | None = None  # the champion's objects are missing or corrupt: why


def score_champion(source: str, test: ArraySplit, test_digest: str, class_names: list[str], metric: str,
                   settings: Settings) -> ChampionScore:
    """The champion (``source``: its registry URI) scored with ``metric`` on this run's test split."""
    try:
        model, manifest = load_published(source, settings)
    except (HeadbenchError, ValueError, KeyError, OSError) as exc:
        if is_transient(exc):  # S3 down: no decision now (the task retries); nothing says the champion is bad
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        return ChampionScore(None, test_data="", unusable=why[:300])
    if manifest["class_names"] != class_names:
        return ChampionScore(None, f"champion classes {manifest['class_names']} differ from this run's "
                                   f"{class_names}; scores are not comparable (use promote=always to replace it)")
    size = int(manifest["image_size"])
    split = test if test.images.shape[-1] == size else ArraySplit(resize_uint8(test.images, size), test.labels)
    metrics = evaluate_split(model, split, len(class_names))
    own = str(manifest.get("lineage", {}).get("split_sha256", {}).get("test", "not recorded"))
    test_data = "same" if own == test_digest else (
        f"{INCOMPARABLE_TEST_DATA} (champion's {own[:12]}, this run's {test_digest[:12]}); the champion was "
        "re-scored on this run's test split")
    return ChampionScore(metrics.as_dict()[metric], None, test_data)


@task(name="promote", timeout_seconds=TIMEOUT_S["promote"],
      retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def promote_model(publication: Publication, metrics: dict[str, float], test: ArraySplit, test_digest: str,
                  class_names: list[str], policy: PromotionPolicy, settings: Settings, tracker: Tracker,
                  context: dict[str, str] | None = None) -> Decision:
    """Decide, then move the alias with a compare-and-set: under the model name's S3 lease, the alias must
    still point at the champion we compared against; if another run moved it, score the new champion and
    decide again."""
    name, version = publication.registered_model, publication.version
    uri = tracker.tracking_uri
    store = ModelStore(s3_client(settings), settings.model_bucket, settings.s3_endpoint_url)
    score = metrics[policy.metric]
    scored: dict[str, ChampionScore] = {}
    pointer = {"model_name": name, "version": version, "s3_uri": publication.s3_uri, "sha256": publication.sha256,
               "mlflow_run_id": tracker.run_id, "metric": policy.metric, "score": score, **(context or {})}
    for _ in range(CAS_ATTEMPTS):
        current = alias_version(uri, name, CHAMPION_ALIAS)
        seen = current.version if current else None
        if seen == version:  # an earlier attempt of this task moved the alias: finish, do not re-decide
            decision = Decision(PROMOTED, "promoted by an earlier attempt", policy.metric, version, score)
            if (store.read_champion(name) or {}).get("version") != version:
                store.write_champion(name, pointer | {"promoted_at": _now()})
            break
        if current is not None and policy.mode == "if-better" and seen not in scored:
            scored[seen] = score_champion(f"models:/{name}/{seen}", test, test_digest, class_names, policy.metric,
                                          settings)
        champion = scored.get(seen, ChampionScore(None))
        decision = decide(policy, version, score, seen, champion.score, champion.incomparable, champion.test_data,
                          champion.unusable)
        if not decision.promoted:
            break
        with store.lease(name, owner=f"{tracker.run_id}/v{version}"):
            now = alias_version(uri, name, CHAMPION_ALIAS)
            if (now.version if now else None) != seen:
                continue  # lost the race: someone promoted meanwhile; compare with the new champion
            set_alias(uri, name, CHAMPION_ALIAS, version)
            store.write_champion(name, pointer | {"previous_version": seen, "reason": decision.reason,
                                                  "promoted_at": _now()})
        break
    else:
        raise HeadbenchError(f"champion alias of {name!r} kept moving; gave up after {CAS_ATTEMPTS} attempts")
    set_version_tags(uri, name, version, decision.as_tags())
    tracker.set_tags(decision.as_tags())
    tracker.log_dict(asdict(decision), "model/promotion.json")
    return decision


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
