"""The recommendation API: `create_app(settings)`; clients opened in `lifespan`.

Routes are thin: validate the tenant id (pattern, before any storage call), authenticate,
rate-limit, take ONE live release reference, answer from it. Every response names that
release and nothing in it comes from another. Unknown users get popular items (optionally
matched on the request's category/tag filters) with fallback=true, never a 500.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated

import numpy as np
import pandas as pd
from fastapi import Body, FastAPI, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline import event_log
from pipeline.config import Settings, get_settings
from pipeline.embeddings import InvalidUserData
from pipeline.serving import auth, rerank
from pipeline.serving.deps import EntityId, Live, TenantId
from pipeline.serving.middleware import TenantPathGuard
from pipeline.serving.releases import LiveRelease, ReleaseCache
from pipeline.serving.schemas import (
    BatchRecommendations,
    BatchRequest,
    Error,
    EventsAccepted,
    EventsRequest,
    Health,
    Options,
    Ranked,
    RankRequest,
    Readiness,
    Reason,
    Recommendations,
    RejectedEvent,
    ScoredItem,
    SimilarItems,
)
from pipeline.storage import open_store

log = logging.getLogger(__name__)

ERRORS = {
    401: {"model": Error, "description": "Missing API key."},
    403: {"model": Error, "description": "The key is not one of this tenant's."},
    404: {"model": Error, "description": "Unknown tenant (nothing published) or unknown item."},
    429: {"model": Error, "description": "The tenant's rate limit is exceeded; see Retry-After."},
}
POST_ERRORS = {400: {"model": Error, "description": "The body is not valid JSON."}, **ERRORS}
MAX_FUTURE_SKEW = timedelta(hours=1)  # events stamped further ahead are refused (clock bugs)
MIN_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)  # as validation's default min_timestamp
REASON_SEEN_ITEMS = 200  # reasons look at the user's most recent items only


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

    def swapped(self, tenant: str, old: str | None, new: str) -> None:
        if old is not None:
            self.live.remove(tenant, old)
        self.live.labels(tenant, new).set(1)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis_users = None
        client = None
        if settings.redis_url:
            from pipeline.embeddings import RedisStore
            from pipeline.refresh import redis_client

            client = redis_client(settings.redis_url)
            redis_users = RedisStore(client, settings.redis_prefix)
        try:
            import faiss

            faiss.omp_set_num_threads(1)  # parallelism comes from concurrent requests
        except ImportError:  # pragma: no cover
            pass
        store = open_store(settings.artifact_root)
        app.state.store = store
        app.state.releases = ReleaseCache(
            store,
            redis_users,
            settings.release_poll_seconds,
            max_folded=settings.fold_in_cache_users,
            on_swap=metrics.swapped,
        )
        app.state.settings = settings
        app.state.access = auth.load_access(settings.api_keys_file)
        if not settings.auth_disabled and not app.state.access.key_hashes:
            log.warning("no API keys configured (RECSYS_API_KEYS_FILE) and auth is on: every request will get 401")
        app.state.rate_limiter = None
        if settings.rate_limit or app.state.access.rate_limits:
            app.state.rate_limiter = auth.RateLimiter(
                settings.rate_limit,
                app.state.access.rate_limits,
                settings.redis_url or "memory://",
                f"{settings.redis_prefix}:ratelimit",
            )
        app.state.metrics = metrics
        yield
        if client is not None:
            client.close()

    app = FastAPI(
        title="recsys-pipeline serving",
        version="1",
        lifespan=lifespan,
        description=(
            "Recommendations from each tenant's published release. Every response carries the "
            "`release_id` it was computed from; one response never mixes two releases. "
            "Authenticate with the tenant's key in `X-API-Key`."
        ),
    )
    app.add_middleware(TenantPathGuard)
    if settings.cors_origins.strip():
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )

    def observe(tenant: str, endpoint: str, started: float) -> None:
        metrics.latency.labels(tenant, endpoint).observe(time.perf_counter() - started)

    def scored(
        live: LiveRelease, rows: np.ndarray, scores: np.ndarray, because: np.ndarray | None = None
    ) -> list[ScoredItem]:
        ids, titles = live.release.item_ids, live.release.item_titles
        out = []
        for j, (r, s) in enumerate(zip(rows, scores, strict=True)):  # the k items of one response
            reason = None
            if because is not None and because[j] >= 0:
                seen_id = ids[int(because[j])]
                name = titles[int(because[j])] if titles is not None else None
                reason = Reason(because_item_id=seen_id, text=f"because you interacted with {name or seen_id}")
            out.append(ScoredItem(item_id=ids[int(r)], score=float(s), reason=reason))
        return out

    def rerank_rows(live: LiveRelease, rows: np.ndarray, scores: np.ndarray, opts: Options) -> np.ndarray:
        """Positions of the final k among score-ordered candidates."""
        pos = np.arange(len(rows))
        if opts.max_per_category is not None:
            pos = rerank.cap_per_category(rows, live.release.item_category, len(rows), opts.max_per_category)
        if opts.diversity > 0:
            pos = pos[rerank.mmr(rows[pos], scores[pos], live.release.item_vectors, opts.k, opts.diversity)]
        return pos[: opts.k]

    def fallback_items(live: LiveRelease, opts: Options, allowed: np.ndarray | None, excluded: np.ndarray):
        eligible = None
        if allowed is not None or len(excluded):
            eligible = np.ones(live.n_items, dtype=bool) if allowed is None else allowed.copy()
            eligible[excluded] = False
        pop = live.release.item_popularity
        want = opts.k * 5 if opts.reranks else opts.k
        rows = rerank.popular_topk(pop, want, eligible)
        scores = (pop[rows] / max(float(pop.max()), 1.0)).astype(np.float32)
        pos = rerank_rows(live, rows, scores, opts)
        return rows[pos], scores[pos]

    def recommend_many(live: LiveRelease, tenant: str, user_ids: list[str], opts: Options) -> list[Recommendations]:
        allowed = live.allowed(opts.filters())
        excluded, _ = live.rows_of(opts.exclude)
        users = live.users.users(live.release, user_ids)
        known = [j for j, u in enumerate(users) if isinstance(u, tuple)]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if known:
            vectors = np.stack([users[j][0] for j in known])
            exclude = [np.concatenate((users[j][1], excluded)) for j in known]
            want = min(max(opts.k * 5, 50), live.n_items) if opts.reranks else opts.k
            rows, scores = live.search(vectors, want, exclude=exclude, allowed=allowed)
            for n, j in enumerate(known):
                ok = rows[n] >= 0
                found[j] = (rows[n][ok], scores[n][ok])
        filtered = allowed is not None
        out = []
        for j, user_id in enumerate(user_ids):  # the users of one request
            because = None
            if j in found:
                rows, scores = found[j]
                pos = rerank_rows(live, rows, scores, opts)
                rows, scores = rows[pos], scores[pos]
                if opts.explain:
                    because = rerank.reasons(rows, users[j][1][:REASON_SEEN_ITEMS], live.release.item_vectors)
                reason = None
            else:
                rows, scores = fallback_items(live, opts, allowed, excluded)
                if isinstance(users[j], InvalidUserData):
                    log.error("tenant %s: %s; serving the fallback", tenant, users[j])
                    reason = "invalid_user_data"
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
                    items=scored(live, rows, scores, because),
                )
            )
        return out

    def one_user(live: LiveRelease, tenant: str, user_id: str):
        try:
            return live.users.user(live.release, user_id)
        except InvalidUserData as exc:
            log.error("tenant %s: %s; serving the fallback", tenant, exc)
            return None

    @app.get(
        "/v1/tenants/{tenant}/users/{user_id}/recommendations",
        response_model=Recommendations,
        responses=ERRORS,
        summary="Top-k items for a user",
    )
    def recommend(tenant: TenantId, live: Live, user_id: EntityId, opts: Annotated[Options, Query()]):
        """Personal top-k (seen items excluded), or popular items with `fallback: true` for an unknown user.

        Filters (`category`, `tag`, their `exclude_` forms, `exclude`) never make the answer shorter
        than `k` while enough items qualify; `diversity` (MMR) or `max_per_category` re-rank.
        """
        started = time.perf_counter()
        body = recommend_many(live, tenant, [user_id], opts)[0]
        observe(tenant, "recommendations", started)
        return body

    @app.get(
        "/v1/tenants/{tenant}/items/{item_id}/similar",
        response_model=SimilarItems,
        responses=ERRORS,
        summary="Items similar to an item",
    )
    def similar(tenant: TenantId, live: Live, item_id: EntityId, opts: Annotated[Options, Query()]) -> SimilarItems:
        started = time.perf_counter()
        row = live.release.item_ids.get_indexer([item_id])[0]
        if row < 0:
            raise HTTPException(404, f"unknown item {item_id!r} for tenant {tenant!r}")
        excluded, _ = live.rows_of(opts.exclude)
        want = min(max(opts.k * 5, 50), live.n_items) if opts.reranks else opts.k
        rows, scores = live.search(
            live.release.item_vectors[row],
            want,
            exclude=[np.concatenate(([row], excluded))],
            allowed=live.allowed(opts.filters()),
        )
        ok = rows[0] >= 0
        rows, scores = rows[0][ok], scores[0][ok]
        pos = rerank_rows(live, rows, scores, opts)
        observe(tenant, "similar", started)
        return SimilarItems(
            tenant=tenant,
            item_id=item_id,
            release_id=live.release_id,
            recommendation_id=uuid.uuid4().hex,
            items=scored(live, rows[pos], scores[pos]),
        )

    @app.post(
        "/v1/tenants/{tenant}/users/{user_id}/rank",
        response_model=Ranked,
        responses=POST_ERRORS,
        summary="Order a candidate list for a user",
    )
    def rank(tenant: TenantId, live: Live, user_id: EntityId, body: RankRequest) -> Ranked:
        """Scores the given candidates (seen ones included: the caller chose them); unknown ids are listed apart."""
        started = time.perf_counter()
        rows, unknown = live.rows_of(list(dict.fromkeys(body.item_ids)))
        user = one_user(live, tenant, user_id)
        if user is not None:
            scores = live.release.item_vectors[rows] @ user[0]
            reason = None
        else:
            pop = live.release.item_popularity
            scores = (pop[rows] / max(float(pop.max()), 1.0)).astype(np.float32)
            reason = "unknown_user"
            metrics.fallbacks.labels(tenant, reason).inc()
        order = np.lexsort((rows, -scores))
        observe(tenant, "rank", started)
        return Ranked(
            tenant=tenant,
            user_id=user_id,
            release_id=live.release_id,
            recommendation_id=uuid.uuid4().hex,
            fallback=reason is not None,
            fallback_reason=reason,
            items=scored(live, rows[order], scores[order]),
            unknown_item_ids=unknown,
        )

    @app.post(
        "/v1/tenants/{tenant}/recommendations/batch",
        response_model=BatchRecommendations,
        responses=POST_ERRORS,
        summary="Top-k items for many users at once",
    )
    def batch(tenant: TenantId, live: Live, body: BatchRequest) -> BatchRecommendations:
        """One index search for all users, all answered from the same release."""
        started = time.perf_counter()
        results = recommend_many(live, tenant, body.user_ids, body.options)
        observe(tenant, "batch", started)
        return BatchRecommendations(tenant=tenant, release_id=live.release_id, results=results)

    @app.post(
        "/v1/tenants/{tenant}/events",
        response_model=EventsAccepted,
        status_code=202,
        responses=POST_ERRORS,
        summary="Record interactions; recommendations react at once",
    )
    def events(request: Request, tenant: TenantId, live: Live, body: Annotated[EventsRequest, Body()]):
        """Appends the events to the tenant's event log (the next extract reads them) and folds
        each user's vector in with the ALS closed form, so their next recommendations already
        reflect these events without retraining.
        """
        started = time.perf_counter()
        now = datetime.now(UTC)
        stamps = [e.timestamp or now for e in body.events]
        stamps = [s if s.tzinfo else s.replace(tzinfo=UTC) for s in stamps]
        rejected = [
            RejectedEvent(index=i, reason=f"timestamp more than {MAX_FUTURE_SKEW} in the future")
            if s > now + MAX_FUTURE_SKEW
            else RejectedEvent(index=i, reason=f"timestamp before {MIN_EVENT_TIME.date()}")
            for i, s in enumerate(stamps)
            if s > now + MAX_FUTURE_SKEW or s < MIN_EVENT_TIME
        ]
        bad = {r.index for r in rejected}
        keep = [i for i in range(len(body.events)) if i not in bad]
        df = pd.DataFrame(
            {
                "user_id": [body.events[i].user_id for i in keep],
                "item_id": [body.events[i].item_id for i in keep],
                "timestamp": pd.to_datetime([stamps[i] for i in keep], utc=True),
                "rating": [np.nan if body.events[i].rating is None else body.events[i].rating for i in keep],
                "event_type": [body.events[i].event_type for i in keep],
            }
        )
        if df.empty:
            observe(tenant, "events", started)
            return EventsAccepted(
                tenant=tenant,
                release_id=live.release_id,
                accepted=0,
                users_folded_in=0,
                unknown_item_ids=[],
                rejected=rejected,
            )
        event_log.append(request.app.state.store, tenant, df)
        metrics.events.labels(tenant).inc(len(df))
        rows = live.release.item_ids.get_indexer(df["item_id"].to_numpy())
        unknown = sorted(set(df.loc[rows < 0, "item_id"]))
        folded = 0
        if live.can_fold_in:
            known = df.assign(row=rows)[rows >= 0].sort_values("timestamp", ascending=False, kind="stable")
            for user_id, part in known.groupby("user_id", sort=True):  # the users of one request
                new_rows = part["row"].to_numpy()
                new_counts = pd.Series(new_rows).value_counts(sort=False)
                current = one_user(live, tenant, str(user_id))
                old = current[1] if current is not None else np.empty(0, dtype=np.int32)
                history = pd.unique(np.concatenate((new_rows, old)))  # newest first, distinct
                counts = new_counts.reindex(history, fill_value=0).to_numpy() + np.isin(history, old)
                vector = rerank.fold_in(
                    live.release.item_vectors, live.gram, history, counts, live.release.model_meta.get("config", {})
                )
                live.users.fold(live.release, str(user_id), vector, history.astype(np.int32))
                folded += 1
            metrics.fold_ins.labels(tenant).inc(folded)
        observe(tenant, "events", started)
        return EventsAccepted(
            tenant=tenant,
            release_id=live.release_id,
            accepted=len(df),
            users_folded_in=folded,
            unknown_item_ids=unknown,
            rejected=rejected,
        )

    @app.get("/healthz", response_model=Health, summary="Liveness")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, summary="Tenants loaded and their releases")
    def readyz(request: Request) -> Readiness:
        return Readiness(status="ok", tenants=request.app.state.releases.loaded())

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
