"""Recommendation answers under experiments: each user's policy (variants.py), the answer from
that policy's release and options (answers.py does the scoring), the response's `variant`, and
one impression per response for the experiment reports (impressions.py; never blocks).

Interleaved users get the two arms' lists merged by team draft; the response names the first
arm's release (its items may come from both: that is the point) and the impression records
each item's team, which is what a click is credited to.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import Response
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings
from pipeline.experiments.interleave import seed_of, team_draft
from pipeline.serving import impressions
from pipeline.serving.answers import Metrics, inline, json_response, recommend_many
from pipeline.serving.impressions import ImpressionLogger
from pipeline.serving.live import LiveRelease
from pipeline.serving.schemas import BatchRecommendations, Options, Recommendations
from pipeline.serving.user_store import aread_users
from pipeline.serving.variants import Policy, Variants
from pipeline.storage import ObjectStore


def open_experiments(
    settings: Settings, store: ObjectStore, registry: CollectorRegistry
) -> tuple[Variants, ImpressionLogger]:
    """The app's experiment state (lifespan): the variants and the started impression writer."""
    logger = ImpressionLogger(
        store,
        registry,
        capacity=settings.impressions_buffer,
        batch=settings.impressions_batch,
        flush_seconds=settings.impressions_flush_seconds,
    )
    logger.start()
    return Variants(settings, store, registry), logger


async def close_experiments(variants: Variants, logger: ImpressionLogger) -> None:
    variants.close()
    await run_in_threadpool(logger.close)  # bounded wait: flushes what is buffered


def served_at() -> datetime:
    return datetime.now(UTC)


def log_impression(
    logger: ImpressionLogger | None,
    rec: Recommendations,
    policy: Policy | None,
    when: datetime,
    teams: list[str] | None = None,
) -> None:
    """One impression per response; never raises (the logger drops and counts on trouble)."""
    if logger is None:
        return
    try:
        logger.log(
            impressions.record(
                rec.tenant,
                rec.recommendation_id,
                rec.user_id,
                rec.release_id,
                [i.item_id for i in rec.items],
                when,
                experiment=policy.experiment if policy else None,
                variant=rec.variant,
                teams=teams,
                fallback=rec.fallback,
            )
        )
    except Exception:  # noqa: BLE001 - an impression must never fail the request
        with contextlib.suppress(Exception):
            logger.dropped.labels(rec.tenant).inc()


def interleaved(policy: Policy, tenant: str, user_id: str, metrics: Metrics) -> tuple[Recommendations, list[str]]:
    """The two arms' top-k merged by team draft (sync: two scorings; runs in the threadpool)."""
    a, b = policy.arms
    first = recommend_many(a.live, tenant, [user_id], a.opts, metrics)[0]
    second = recommend_many(b.live, tenant, [user_id], b.opts, metrics)[0]
    rid = uuid.uuid4().hex
    lists = (first.items, second.items)
    merged = team_draft([i.item_id for i in first.items], [i.item_id for i in second.items], a.opts.k, seed_of(rid))
    rec = first.model_copy(
        update={
            "recommendation_id": rid,
            "items": [lists[t][i] for t, i in merged],
            "fallback": first.fallback and second.fallback,
            "degraded": first.degraded or second.degraded,
            "variant": policy.variant,
        }
    )
    return rec, [(a.arm, b.arm)[t] for t, _ in merged]


async def recommend(
    state: Any,
    live: LiveRelease,
    tenant: str,
    user_id: str,
    opts: Options,
    metrics: Metrics,
) -> Response:
    """The recommendations route's answer under the user's policy, with its impression logged.
    `state`: the app's state (its `variants` and `impressions`)."""
    policy = state.variants.policy(tenant, live, user_id, opts)
    teams = None
    if policy.interleaved:
        rec, teams = await run_in_threadpool(interleaved, policy, tenant, user_id, metrics)
    else:
        arm = policy.arms[0]
        read = await aread_users(arm.live.users, arm.live.release, [user_id], arm.live.degraded)
        if inline(arm.opts):
            rec = recommend_many(arm.live, tenant, [user_id], arm.opts, metrics, read)[0]
        else:
            rec = (await run_in_threadpool(recommend_many, arm.live, tenant, [user_id], arm.opts, metrics, read))[0]
        rec.variant = policy.variant
    log_impression(state.impressions, rec, policy, served_at(), teams)
    return json_response(rec)


def recommend_batch(
    state: Any,
    live: LiveRelease,
    tenant: str,
    user_ids: list[str],
    opts: Options,
    metrics: Metrics,
) -> BatchRecommendations:
    """Users grouped by policy, one scoring pass per group (most are in the default group)."""
    policies = [state.variants.policy(tenant, live, u, opts) for u in user_ids]  # a hash per user of the batch
    out: list[Recommendations | None] = [None] * len(user_ids)
    teams: list[list[str] | None] = [None] * len(user_ids)
    groups: dict[tuple[int, str | None, str | None], list[int]] = {}
    for j, p in enumerate(policies):
        if p.interleaved:
            out[j], teams[j] = interleaved(p, tenant, user_ids[j], metrics)
        else:
            groups.setdefault((id(p.live), p.experiment, p.variant), []).append(j)  # same arm: same options
    for members in groups.values():
        p = policies[members[0]]
        results = recommend_many(p.live, tenant, [user_ids[j] for j in members], p.opts, metrics)
        for j, rec in zip(members, results, strict=True):
            rec.variant = p.variant
            out[j] = rec
    now = served_at()
    results = [r for r in out if r is not None]
    for j, rec in enumerate(results):
        log_impression(state.impressions, rec, policies[j], now, teams[j])
    return BatchRecommendations(
        tenant=tenant, release_id=live.release_id, degraded=any(r.degraded for r in results), results=results
    )
