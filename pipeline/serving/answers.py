"""What the routes compute, as plain functions of one live release (pipeline/serving/app.py
holds only the routes): candidate search, re-ranking, reasons, the popular fallback, and
the fold-in of posted events. Every function takes the ONE `LiveRelease` of its request.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from fastapi import HTTPException, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pipeline.models import als_fold
from pipeline.release import segments
from pipeline.serving import rerank
from pipeline.serving.breaker import Unavailable
from pipeline.serving.live import LiveRelease
from pipeline.serving.schemas import Options, Reason, Recommendations, RejectedEvent, ScoredItem, SimilarItems
from pipeline.serving.user_store import InvalidUserData, UserData, aread_users, read_users

log = logging.getLogger(__name__)

MAX_FUTURE_SKEW = timedelta(hours=1)  # events stamped further ahead are refused (clock bugs)
MIN_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)  # as validation's default min_timestamp


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "recsys_request_seconds",
            "Request latency",
            ["tenant", "endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.fallbacks = Counter(
            "recsys_fallbacks_total", "Users served the fallback list", ["tenant", "reason"], registry=self.registry
        )
        self.live = Gauge(
            "recsys_live_release",
            "1 for the release each tenant serves",
            ["tenant", "release_id"],
            registry=self.registry,
        )
        self.rate_limited = Counter("recsys_rate_limited_total", "429 answers", ["tenant"], registry=self.registry)
        self.events = Counter("recsys_events_total", "Events accepted", ["tenant"], registry=self.registry)
        self.fold_ins = Counter("recsys_fold_ins_total", "User vectors folded in", ["tenant"], registry=self.registry)
        self.candidates = Counter(
            "recsys_candidate_source_total",
            "Known users answered from the release's precomputed candidates or by a live search",
            ["tenant", "source"],
            registry=self.registry,
        )
        self.similar = Counter(
            "recsys_similar_source_total",
            "Similar-items answers from the release's precomputed neighbours or by a live search",
            ["tenant", "source"],
            registry=self.registry,
        )
        self.degraded = Counter(
            "recsys_degraded_total",
            "Answers served without the configured user store (Redis down, slow or its breaker open)",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.unavailable = Counter(
            "recsys_unavailable_total",
            "503s: no release loaded for the tenant",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "recsys_release_load_failures_total",
            "Releases refused (checksum, missing or unreadable file): alert on any increase",
            ["tenant", "release_id"],
            registry=self.registry,
        )
        self.breaker = Gauge(
            "recsys_breaker_state",
            "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open",
            ["dependency"],
            registry=self.registry,
        )

    def breaker_state(self, dependency: str, state: int) -> None:
        self.breaker.labels(dependency).set(state)

    def load_failed(self, tenant: str, release_id: str) -> None:
        self.load_failures.labels(tenant, release_id).inc()

    def degrade(self, tenant: str, reason: str | None) -> bool:
        """Count a degraded answer; returns whether it was one (the response's `degraded`)."""
        if reason is None:
            return False
        self.degraded.labels(tenant, reason).inc()
        return True

    def swapped(self, tenant: str, old: str | None, new: str) -> None:
        if old is not None:
            self.live.remove(tenant, old)
        self.live.labels(tenant, new).set(1)


def scored(
    live: LiveRelease, rows: np.ndarray, scores: np.ndarray, because: np.ndarray | None = None
) -> list[ScoredItem]:
    ids, titles = live.item_id_array, live.release.item_titles
    out = []
    item_ids = ids[np.asarray(rows, dtype=np.int64)].tolist()  # one gather: indexing a pd.Index per item is slow
    for j, (item_id, s) in enumerate(zip(item_ids, np.asarray(scores).tolist(), strict=True)):  # the k items
        reason = None
        if because is not None and because[j] >= 0:
            seen_id = ids[int(because[j])]
            name = titles[int(because[j])] if titles is not None else None
            reason = Reason(because_item_id=seen_id, text=f"because you interacted with {name or seen_id}")
        out.append(ScoredItem(item_id=item_id, score=s, reason=reason))
    return out


def candidates_wanted(live: LiveRelease, opts: Options) -> int:
    """How many to fetch before re-ranking: k, or a wider pool when diversity/caps re-rank."""
    return min(max(opts.k * 5, 50), live.n_items) if opts.reranks else opts.k


def rerank_rows(live: LiveRelease, rows: np.ndarray, scores: np.ndarray, opts: Options) -> np.ndarray:
    """Positions of the final k among score-ordered candidates."""
    pos = np.arange(len(rows))
    if opts.max_per_category is not None:
        pos = rerank.cap_per_category(rows, live.release.item_category, len(rows), opts.max_per_category)
    if opts.diversity > 0:
        pos = pos[rerank.mmr(rows[pos], scores[pos], live.item_space, opts.k, opts.diversity)]
    return pos[: opts.k]


def fallback_items(
    live: LiveRelease, opts: Options, allowed: np.ndarray | None, excluded: np.ndarray, segment: int | None = None
):
    """Popular items; for a cold user with a segment (release/segments.py), the segment's first."""
    eligible = None
    if allowed is not None or len(excluded):
        eligible = np.ones(live.n_items, dtype=bool) if allowed is None else allowed.copy()
        eligible[excluded] = False
    pop = live.release.item_popularity
    if segment is not None and live.release.segment_popular is not None:
        pop = segments.boosted_popularity(pop, live.release.segment_popular[segment])
    want = opts.k * 5 if opts.reranks else opts.k
    rows = rerank.popular_topk(pop, want, eligible)
    scores = (pop[rows] / max(float(pop.max()), 1.0)).astype(np.float32)
    pos = rerank_rows(live, rows, scores, opts)
    return rows[pos], scores[pos]


def cold_segment(live: LiveRelease, user_id: str) -> int | None:
    """The segment row of a user the release knows only from the tenant's user table, else None."""
    seg = live.release.segment_of
    if seg is None:
        return None
    got = seg.get(user_id)
    return None if got is None else int(got)


def inline(opts: Options) -> bool:
    """Whether an async route may compute on the event loop: a plain request (no filters, no
    re-ranking) costs ~0.1-0.3 ms (precomputed slice or one-query search); filtered or
    re-ranked ones can take milliseconds and go to the threadpool so they never stall the loop."""
    return not opts.reranks and not any(opts.filters())


def json_response(body: BaseModel) -> Response:
    """The model as JSON, serialised once: returning a Response skips FastAPI's re-validation of
    the `response_model` (the OpenAPI schema still comes from it)."""
    return Response(body.model_dump_json(), media_type="application/json")


async def recommend_one(live: LiveRelease, tenant: str, user_id: str, opts: Options, metrics: Metrics) -> Response:
    """The recommendations route's answer: the user read awaited (redis.asyncio), then the scoring."""
    read = await aread_users(live.users, live.release, [user_id], live.degraded)
    if inline(opts):
        return json_response(recommend_many(live, tenant, [user_id], opts, metrics, read)[0])
    return json_response((await run_in_threadpool(recommend_many, live, tenant, [user_id], opts, metrics, read))[0])


def similar_items(live: LiveRelease, tenant: str, item_id: str, opts: Options, metrics: Metrics) -> SimilarItems:
    row = live.row_of_item(item_id)
    if row < 0:
        raise HTTPException(404, f"unknown item {item_id!r} for tenant {tenant!r}")
    excluded, _ = live.rows_of(opts.exclude)
    wanted, allowed = candidates_wanted(live, opts), live.allowed(opts.filters())
    found = live.precomputed_neighbors(row, wanted, excluded, allowed) if live.scoring == "dot" else None
    if live.scoring == "dot":
        metrics.similar.labels(tenant, "search" if found is None else "precomputed").inc()
    rows, scores = found if found is not None else live.similar_items(row, wanted, excluded, allowed)
    ok = rows >= 0
    rows, scores = rows[ok], scores[ok]
    pos = rerank_rows(live, rows, scores, opts)
    return SimilarItems(
        tenant=tenant,
        item_id=item_id,
        release_id=live.release_id,
        recommendation_id=uuid.uuid4().hex,
        items=scored(live, rows[pos], scores[pos]),
    )


def recommend_many(
    live: LiveRelease,
    tenant: str,
    user_ids: list[str],
    opts: Options,
    metrics: Metrics,
    read: tuple[list[UserData | None | InvalidUserData], str | None] | None = None,
) -> list[Recommendations]:
    """One scoring pass for every known user of the request (an index search, or the item-item
    sums); popular items for the others, and for item-item users with nothing seen. `read`: the
    users already read (`aread_users`), else they are read here."""
    allowed = live.allowed(opts.filters())
    excluded, _ = live.rows_of(opts.exclude)
    users, reason = read or read_users(live.users, live.release, user_ids, live.degraded)
    degraded = metrics.degrade(tenant, reason)
    personal: dict[int, UserData] = {j: u for j, u in enumerate(users) if isinstance(u, tuple) and live.personal(u)}
    known = list(personal)
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    want = candidates_wanted(live, opts)
    second = live.release.two_stage  # a ranker to apply after retrieval, when the gate chose two stages
    fetch = max(want, second.model_candidates) if second is not None else want
    search = []
    for j in known:  # the users of one request: the release's precomputed candidates where they hold
        got = live.precomputed(user_ids[j], personal[j], fetch, excluded, allowed) if live.scoring == "dot" else None
        if got is None:
            search.append(j)
        else:
            found[j] = got
    if found:
        metrics.candidates.labels(tenant, "precomputed").inc(len(found))
    if search:
        metrics.candidates.labels(tenant, "search").inc(len(search))
        exclude = [np.concatenate((personal[j][1], excluded)) for j in search]
        rows, scores = live.top_items([personal[j] for j in search], fetch, exclude, allowed)
        for n, j in enumerate(search):
            ok = rows[n] >= 0
            found[j] = (rows[n][ok], scores[n][ok])
    if second is not None:
        for j in found:  # the users of one request: the ranker reorders each one's merged candidates
            found[j] = second_stage(live, user_ids[j], personal[j], found[j], excluded, allowed, want)
    filtered = allowed is not None
    out = []
    for j, user_id in enumerate(user_ids):  # the users of one request
        because = None
        if j in found:
            rows, scores = found[j]
            pos = rerank_rows(live, rows, scores, opts)
            rows, scores = rows[pos], scores[pos]
            if opts.explain:
                because = live.reasons(rows, personal[j][1])
            reason = None
        else:
            segment = cold_segment(live, user_id) if users[j] is None else None
            rows, scores = fallback_items(live, opts, allowed, excluded, segment)
            if segment is not None:
                reason = "cold_user_segment"
            elif isinstance(users[j], InvalidUserData):
                log.error("tenant %s: %s; serving the fallback", tenant, users[j])
                reason = "invalid_user_data"
            elif isinstance(users[j], tuple):  # known, but an item-item release has nothing to score from
                reason = "no_seen_items"
            else:
                reason = "unknown_user_matched_on_attributes" if filtered else "unknown_user"
            metrics.fallbacks.labels(tenant, reason).inc()
        out.append(
            Recommendations(
                tenant=tenant,
                user_id=user_id,
                release_id=live.release_id,
                recommendation_id=uuid.uuid4().hex,
                fallback=reason is not None,
                fallback_reason=reason,
                degraded=degraded,
                items=scored(live, rows, scores, because),
            )
        )
    return out


def second_stage(
    live: LiveRelease,
    user_id: str,
    user: UserData,
    retrieved: tuple[np.ndarray, np.ndarray],
    excluded: np.ndarray,
    allowed: np.ndarray | None,
    want: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The release's ranker over the user's merged candidates (pipeline/twostage/serve.py); a user
    the release does not know (new since, folded in) has no statistics: retrieval's order stands."""
    row = live.row_of_user(user_id)
    rows, scores = retrieved
    if row is None:
        return rows[:want], scores[:want]
    banned = np.concatenate((user[1], excluded)).astype(np.int64)
    return live.release.two_stage.rank(row, user[1], rows, scores, banned, allowed, want)


def one_user(live: LiveRelease, tenant: str, user_id: str) -> tuple[UserData | None, str | None]:
    """The user's data (None: unknown, or corrupt and logged) and why it is degraded (None: not)."""
    (got,), reason = read_users(live.users, live.release, [user_id], live.degraded)
    if isinstance(got, InvalidUserData):
        log.error("tenant %s: %s; serving the fallback", tenant, got)
        return None, reason
    return got, reason


def rejected_events(stamps: list[datetime], now: datetime) -> list[RejectedEvent]:
    """Events not to log: stamped beyond the clock-skew allowance, or implausibly old."""
    return [
        RejectedEvent(index=i, reason=f"timestamp more than {MAX_FUTURE_SKEW} in the future")
        if s > now + MAX_FUTURE_SKEW
        else RejectedEvent(index=i, reason=f"timestamp before {MIN_EVENT_TIME.date()}")
        for i, s in enumerate(stamps)
        if s > now + MAX_FUTURE_SKEW or s < MIN_EVENT_TIME
    ]


def fold_in_events(
    live: LiveRelease, tenant: str, events: pd.DataFrame, rows: np.ndarray, metrics: Metrics
) -> tuple[int, bool]:
    """Update each user from their history plus these events, the way the registry says the
    release's kind folds in, and store it under the live release; returns how many users, and
    whether the user store was unavailable (the rest not folded in: degraded).

    "vector" (ALS): re-solve the vector (the model's closed form). "seen_list" (item-item): the
    new seen list, newest first, is the update: the next request scores from it. "sequence"
    (SASRec): the release's encoder over the new seen list gives the vector (no solve).
    """
    folded = 0
    if live.can_fold_in:
        known = events.assign(row=rows)[rows >= 0].sort_values("timestamp", ascending=False, kind="stable")
        try:
            for user_id, part in known.groupby("user_id", sort=True):  # the users of one request
                new_rows = part["row"].to_numpy()
                current, reason = one_user(live, tenant, str(user_id))
                if reason is not None:  # never fold onto the release's stale row: the store must answer
                    raise Unavailable(reason)
                old = current[1] if current is not None else np.empty(0, dtype=np.int32)
                history = pd.unique(np.concatenate((new_rows, old)))  # newest first, distinct
                if live.fold_in == "seen_list":
                    vector = np.empty(0, dtype=np.float32)  # zero-width, as the release's own vectors
                elif live.fold_in == "sequence" and live.release.encoder is not None:
                    vector = live.release.encoder.encode(history)  # the encoder over the new seen list
                else:
                    new_counts = pd.Series(new_rows).value_counts(sort=False)
                    counts = new_counts.reindex(history, fill_value=0).to_numpy() + np.isin(history, old)
                    vector = als_fold.fold_in_user(
                        live.release.item_vectors, live.gram, history, counts, live.fold_in_config
                    )
                live.users.fold(live.release, str(user_id), vector, history.astype(np.int32))
                folded += 1
        except Unavailable as exc:  # the events are in the log (the next run learns them); fold-ins wait
            log.warning(
                "tenant %s: user store unavailable (%s): events logged, %d users folded in", tenant, exc, folded
            )
            metrics.fold_ins.labels(tenant).inc(folded)
            return folded, metrics.degrade(tenant, "fold_in_skipped")
        metrics.fold_ins.labels(tenant).inc(folded)
    return folded, False
