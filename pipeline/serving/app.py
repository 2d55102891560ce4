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
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import Body, FastAPI, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.config import Settings, get_settings
from pipeline.data import event_log
from pipeline.serving import auth
from pipeline.serving.admission import Admission, AdmissionMetrics, WorkQuota, charge
from pipeline.serving.answers import (
    Metrics,
    candidates_wanted,
    fold_in_events,
    one_user,
    recommend_many,
    rejected_events,
    rerank_rows,
    scored,
)
from pipeline.serving.deps import EntityId, Live, TenantId
from pipeline.serving.limits import BodyLimit
from pipeline.serving.live import ReleaseCache
from pipeline.serving.middleware import TenantPathGuard
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
    Recommendations,
    SimilarItems,
    work_units,
)
from pipeline.storage import open_store

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "Missing API key."},
    403: {"model": Error, "description": "The key is not one of this tenant's."},
    404: {"model": Error, "description": "Unknown tenant (nothing published) or unknown item."},
    429: {"model": Error, "description": "The tenant's rate limit or work quota is exceeded; see Retry-After."},
    503: {"model": Error, "description": "The server is at capacity (load shedding); see Retry-After."},
}
POST_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "The body is not valid JSON."},
    413: {"model": Error, "description": "The body is over RECSYS_MAX_BODY_BYTES (refused unread)."},
    **ERRORS,
}
EVENT_UNITS = 50  # work units of one posted event: a fold-in solve costs about a 50-candidate scoring


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    admission = AdmissionMetrics(metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis_users = None
        client = None
        if settings.redis_url:
            from pipeline.serving.user_store import RedisStore
            from pipeline.storage.redis import redis_client

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
        app.state.work_quota = WorkQuota(settings.tenant_work_limit, admission) if settings.tenant_work_limit else None
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
    # outermost last: CORS, tenant-id guard, body limit + auth of POSTs, admission control, routes
    app.add_middleware(
        Admission,
        capacity=settings.max_concurrency,
        queue=settings.admission_queue,
        queue_wait_s=settings.admission_wait_ms / 1e3,
        retry_after_s=settings.retry_after_seconds,
        metrics=admission,
        quota_of=lambda: getattr(app.state, "work_quota", None),
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        access_of=lambda: None if settings.auth_disabled else getattr(app.state, "access", None),
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

    @app.get(
        "/v1/tenants/{tenant}/users/{user_id}/recommendations",
        response_model=Recommendations,
        responses=ERRORS,
        summary="Top-k items for a user",
    )
    def recommend(request: Request, tenant: TenantId, live: Live, user_id: EntityId, opts: Annotated[Options, Query()]):
        """Personal top-k (seen items excluded), or popular items with `fallback: true` for an unknown user.

        Filters (`category`, `tag`, their `exclude_` forms, `exclude`) never make the answer shorter
        than `k` while enough items qualify; `diversity` (MMR) or `max_per_category` re-rank.
        """
        started = time.perf_counter()
        charge(request, tenant, work_units(1, opts.k, opts.reranks))
        body = recommend_many(live, tenant, [user_id], opts, metrics)[0]
        observe(tenant, "recommendations", started)
        return body

    @app.get(
        "/v1/tenants/{tenant}/items/{item_id}/similar",
        response_model=SimilarItems,
        responses=ERRORS,
        summary="Items similar to an item",
    )
    def similar(
        request: Request, tenant: TenantId, live: Live, item_id: EntityId, opts: Annotated[Options, Query()]
    ) -> SimilarItems:
        started = time.perf_counter()
        charge(request, tenant, work_units(1, opts.k, opts.reranks))
        row = live.row_of_item(item_id)
        if row < 0:
            raise HTTPException(404, f"unknown item {item_id!r} for tenant {tenant!r}")
        excluded, _ = live.rows_of(opts.exclude)
        rows, scores = live.similar_items(row, candidates_wanted(live, opts), excluded, live.allowed(opts.filters()))
        ok = rows >= 0
        rows, scores = rows[ok], scores[ok]
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
    def rank(request: Request, tenant: TenantId, live: Live, user_id: EntityId, body: RankRequest) -> Ranked:
        """Scores the given candidates (seen ones included: the caller chose them); unknown ids are listed apart."""
        started = time.perf_counter()
        charge(request, tenant, len(body.item_ids))
        rows, unknown = live.rows_of(list(dict.fromkeys(body.item_ids)))
        user = one_user(live, tenant, user_id)
        if user is not None and live.personal(user):
            scores = live.scores_of(user, rows)
            reason = None
        else:
            pop = live.release.item_popularity
            scores = (pop[rows] / max(float(pop.max()), 1.0)).astype(np.float32)
            reason = "unknown_user" if user is None else "no_seen_items"
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
    def batch(request: Request, tenant: TenantId, live: Live, body: BatchRequest) -> BatchRecommendations:
        """One index search for all users, all answered from the same release; charged users x candidates."""
        started = time.perf_counter()
        charge(request, tenant, work_units(len(body.user_ids), body.options.k, body.options.reranks))
        results = recommend_many(live, tenant, body.user_ids, body.options, metrics)
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
        each user in (ALS: the vector's closed form; EASE, item-kNN: the new seen list), so their
        next recommendations already reflect these events without retraining.
        """
        started = time.perf_counter()
        charge(request, tenant, EVENT_UNITS * len(body.events))
        now = datetime.now(UTC)
        stamps = [e.timestamp or now for e in body.events]
        stamps = [s if s.tzinfo else s.replace(tzinfo=UTC) for s in stamps]
        rejected = rejected_events(stamps, now)
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
        folded = fold_in_events(live, tenant, df, rows, metrics)
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
