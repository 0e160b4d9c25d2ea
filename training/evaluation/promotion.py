"""Promotion through registry aliases: ``@candidate`` → ``@champion`` only when better.

The candidate and the current champion are evaluated with the same evaluator, data
and seed. Moving the aliases happens under a registry-wide lock (a registered model
named ``<NAME>.promotion-lock``, whose creation the registry database makes atomic),
and only if ``@champion`` still points where it pointed when the evaluation began;
a promotion that loses either race says so and changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from data.manifest import load_manifest
from training.evaluation.evaluator import get_evaluator
from training.evaluation.scoring import (
    EvaluationSettings,
    evaluate_model,
    log_evaluation,
)
from training.mlflow.registry import alias_version, load_model_version
from training.mlflow.tracking import DATASET_URL_TAG
from training.names import PromotionMetric

logger = logging.getLogger(__name__)
LOWER_IS_BETTER = {"fd": True, "class_consistency": False}
STALE_LOCK_SECONDS = 600


class PromotionConflict(RuntimeError):
    """Another promotion of the same model holds the lock or moved the champion."""


@dataclass
class PromotionResult:
    promoted: bool
    candidate: str
    champion_before: str | None
    reason: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # version → metrics
    lost_race: bool = False  # another promotion held the lock or moved @champion first


def promote(
    name: str,
    tracking_uri: str,
    evaluator_cache: str,
    version: str | None = None,
    metric: PromotionMetric = "fd",
    min_improvement: float = 0.0,
    force: bool = False,
    data_url: str | None = None,
    settings: EvaluationSettings | None = None,
    progress: bool = False,
) -> PromotionResult:
    """Evaluate ``version`` (default: ``@candidate``) and ``@champion``; move
    ``@champion`` to the candidate when its ``metric`` is better by more than
    ``min_improvement`` (or there is no champion, or ``force``). ``progress``: a bar
    per evaluated version on an interactive stderr."""
    client = MlflowClient(tracking_uri)
    settings = settings or EvaluationSettings()
    candidate = version or alias_version(client, name, "candidate")
    if candidate is None:
        raise ValueError(f"model {name!r} has no @candidate version; pass --version")
    champion = alias_version(client, name, "champion")
    if champion == candidate:
        reason = f"version {candidate} is already @champion"
        return PromotionResult(False, candidate, champion, reason)
    data_url = data_url or _training_data(client, name, candidate)
    require_val_split(data_url)
    evaluator = get_evaluator(data_url, evaluator_cache)
    metrics = {}
    for v in filter(None, (candidate, champion)):
        report = evaluate_model(
            load_model_version(f"models:/{name}/{v}", tracking_uri),
            data_url,
            evaluator,
            settings,
            progress=f"evaluating {name} v{v}" if progress else None,
        )
        log_evaluation(report, settings, tracking_uri, name, v)
        metrics[v] = report.metrics
    promoted, reason = _decide(metrics, candidate, champion, metric, min_improvement, force)
    result = PromotionResult(promoted, candidate, champion, reason, metrics)
    if promoted:
        try:
            with _RegistryLock(client, name):
                _move_aliases(client, name, candidate, champion)
        except PromotionConflict as lost:
            result.promoted, result.lost_race = False, True
            result.reason = f"lost a race with another promotion: {lost}"
    _tag_decision(client, name, result)
    return result


def rollback(name: str, tracking_uri: str) -> tuple[str, str]:
    """Point ``@champion`` back at ``@previous``; returns (from_version, to_version)."""
    client = MlflowClient(tracking_uri)
    with _RegistryLock(client, name):
        previous = alias_version(client, name, "previous")
        champion = alias_version(client, name, "champion")
        if previous is None:
            raise ValueError(f"model {name!r} has no @previous version to roll back to")
        client.set_registered_model_alias(name, "champion", previous)
        client.delete_registered_model_alias(name, "previous")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if champion is not None:
        client.set_model_version_tag(name, champion, "promotion.rolled_back_at", now)
    client.set_model_version_tag(
        name, previous, "promotion.reason", f"restored as @champion by rollback from v{champion}"
    )
    return str(champion), previous


def _decide(metrics, candidate, champion, metric, min_improvement, force) -> tuple[bool, str]:
    if force:
        return True, "forced promotion (--force)"
    if champion is None:
        return True, "first model: there was no @champion"
    ours, theirs = metrics[candidate][metric], metrics[champion][metric]
    gain = theirs - ours if LOWER_IS_BETTER[metric] else ours - theirs
    better = gain > min_improvement
    comparison = (
        f"{metric} {ours:.4g} vs champion v{champion} {theirs:.4g} "
        f"(improvement {gain:+.4g}, required > {min_improvement:g})"
    )
    return better, ("better: " if better else "not better: ") + comparison


def _move_aliases(client: MlflowClient, name: str, candidate: str, expected: str | None) -> None:
    current = alias_version(client, name, "champion")
    if current != expected:
        raise PromotionConflict(
            f"@champion moved to v{current} while v{candidate} was being evaluated against "
            f"v{expected}; run promote again to compare with the new champion"
        )
    if expected is not None:
        client.set_registered_model_alias(name, "previous", expected)
    client.set_registered_model_alias(name, "champion", candidate)


def _tag_decision(client: MlflowClient, name: str, result: PromotionResult) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    decision = "promoted" if result.promoted else "kept"
    client.set_model_version_tag(name, result.candidate, "promotion.decision", decision)
    client.set_model_version_tag(name, result.candidate, "promotion.reason", result.reason)
    client.set_model_version_tag(name, result.candidate, "promotion.decided_at", now)
    if result.champion_before is not None:
        verdict = "replaced" if result.promoted else "kept"
        note = f"{verdict} against candidate v{result.candidate}: {result.reason}"
        client.set_model_version_tag(name, result.champion_before, "promotion.decision", verdict)
        client.set_model_version_tag(name, result.champion_before, "promotion.reason", note)


def require_val_split(data_url: str) -> None:
    """The evaluator and the Fréchet distance measure on the val split: without one,
    fail now with the fix instead of after minutes of work."""
    manifest = load_manifest(data_url)
    if manifest.counts.get("val", 0) == 0:
        raise ValueError(
            f"the dataset {data_url} has no val split, which evaluation and promotion need: "
            "re-shard it with --val-fraction 0.1 (or any value above 0), or pass --data "
            "with a dataset that has one"
        )


def _training_data(client: MlflowClient, name: str, version: str) -> str:
    run_id = client.get_model_version(name, version).run_id
    url = client.get_run(run_id).data.tags.get(DATASET_URL_TAG) if run_id else None
    if not url:
        raise ValueError(
            f"cannot tell which dataset trained {name} v{version} (no {DATASET_URL_TAG} tag "
            "on its run); pass --data"
        )
    return url


class _RegistryLock:
    """A mutex per registered model: creating ``<name>.promotion-lock`` either succeeds
    or fails with RESOURCE_ALREADY_EXISTS, atomically, in the registry's database.

    The lock carries its holder's token; only that holder releases it. A lock older
    than ``STALE_LOCK_SECONDS`` (its holder died) may be broken, by exactly one
    contender: breaking first creates ``<lock>.broken-<stale token>``, which only one
    can do, and the marker stays so that nobody can break the same lock twice.
    """

    def __init__(self, client: MlflowClient, name: str):
        self.client, self.lock_name = client, f"{name}.promotion-lock"
        self.token = uuid.uuid4().hex

    def __enter__(self) -> _RegistryLock:
        for _ in range(2):
            try:
                self.client.create_registered_model(
                    self.lock_name,
                    tags={"holder": self.token, "since": str(time.time())},
                    description="Held while a promotion moves aliases; deleted after.",
                )
                return self
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                if not self._break_if_stale():
                    raise PromotionConflict(
                        "another promotion of this model is moving its aliases right now"
                    ) from None
        raise PromotionConflict("could not take the promotion lock")

    def _holder(self) -> tuple[str, float] | None:
        """(token, since) of the lock's holder; None when nobody holds it."""
        try:
            held = self.client.get_registered_model(self.lock_name)
        except MlflowException:
            return None
        return held.tags.get("holder", ""), float(held.tags.get("since", "0"))

    def _break_if_stale(self) -> bool:
        """True when the lock is free now (released, or stale and broken by us)."""
        holder = self._holder()
        if holder is None:
            return True  # released meanwhile: try again
        token, since = holder
        if time.time() - since <= STALE_LOCK_SECONDS:
            return False
        try:  # the claim to break this holder's lock: one contender only
            self.client.create_registered_model(
                f"{self.lock_name}.broken-{token or 'unknown'}",
                tags={"breaker": self.token, "at": str(time.time())},
                description="Marks a stale promotion lock as broken; safe to delete later.",
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            raise PromotionConflict("another promotion is breaking a stale lock") from None
        if self._holder() == holder:
            self.client.delete_registered_model(self.lock_name)
        return True

    def __exit__(self, *exc: object) -> None:
        holder = self._holder()
        if holder is not None and holder[0] == self.token:
            self.client.delete_registered_model(self.lock_name)
        else:  # broken as stale while held: the aliases were moved anyway; say so
            logger.warning(
                "the promotion lock %s was no longer ours on release; not touching it",
                self.lock_name,
            )
