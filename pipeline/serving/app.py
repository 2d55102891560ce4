"""The recommendation API: `create_app(settings)`; clients opened in `lifespan`.

Routes are thin: validate the tenant id (pattern, before any storage call), authenticate,
rate-limit, take ONE live release reference, answer from it. Every response names that
release and nothing in it comes from another. Unknown users get popular items (optionally
matched on the request's category/tag filters) with fallback=true, never a 500.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

import numpy as np
import pandas as pd
from fastapi import Body, Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings, get_settings
from pipeline.data import event_log
from pipeline.serving import auth
from pipeline.serving import variant_answers as va
from pipeline.serving.admission import Admission, AdmissionMetrics, WorkQuota, charge
from pipeline.serving.answers import (
    Metrics,
    fold_in_events,
    inline,
    json_response,
    one_user,
    rejected_events,
    scored,
    similar_items,
)
from pipeline.serving.breaker import Breaker, outage_types
from pipeline.serving.deps import EntityId, Live, QueryOptions, TenantId, as_utc, options_parameters, receive_time
from pipeline.serving.limits import BodyLimit
from pipeline.serving.loader import Loaders, serving_tenants
from pipeline.serving.loop_lag import LoopLag
from pipeline.serving.middleware import TenantPathGuard
from pipeline.serving.rate_limit import RateLimiter
from pipeline.serving.releases import ReleaseCache
from pipeline.serving.schemas import (
    ERRORS,
    POST_ERRORS,
    BatchRecommendations,
    BatchRequest,
    EventsAccepted,
    EventsRequest,
    Health,
    Ranked,
    RankRequest,
    Readiness,
    Recommendations,
    SimilarItems,
    work_units,
)
from pipeline.storage import open_store

log = logging.getLogger(__name__)

AdminHeader = Annotated[str | None, Header(include_in_schema=False)]


EVENT_UNITS = 50  # work units of one posted event: a fold-in solve costs about a 50-candidate scoring


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    admission = AdmissionMetrics(metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis_users = None
        client = aclient = None
        redis_breaker = Breaker(
            "redis", settings.breaker_failures, settings.breaker_reset_seconds, on_state=metrics.breaker_state
        )
        store_breaker = Breaker(
            "object_store", settings.breaker_failures, settings.breaker_reset_seconds, on_state=metrics.breaker_state
        )
        if settings.redis_url:
            from pipeline.serving.user_store import ResilientRedisStore
            from pipeline.storage.redis import aclose_bounded, serving_async_redis_client, serving_redis_client

            client = serving_redis_client(settings.redis_url, settings.redis_timeout_ms)
            aclient = serving_async_redis_client(settings.redis_url, settings.redis_timeout_ms)
            redis_users = ResilientRedisStore(client, settings.redis_prefix, redis_breaker, aclient)
        try:
            import faiss

            faiss.omp_set_num_threads(1)  # parallelism comes from concurrent requests
        except ImportError:  # pragma: no cover
            pass
        s3_config = None
        if settings.artifact_root.startswith("s3://"):
            from pipeline.storage.s3 import serving_config

            s3_config = serving_config(
                settings.s3_connect_timeout_s, settings.s3_read_timeout_s, settings.s3_max_attempts
            )
        store = open_store(settings.artifact_root, s3_config=s3_config)
        app.state.store = store
        app.state.releases = ReleaseCache(
            store,
            redis_users,
            settings.release_poll_seconds,
            max_folded=settings.fold_in_cache_users,
            on_swap=metrics.swapped,
            retry_seconds=settings.release_retry_seconds,
            store_breaker=store_breaker,
            on_load_failure=metrics.load_failed,
        )
        app.state.loaders = Loaders(app.state.releases, settings.release_poll_seconds, serving_tenants(settings))
        app.state.settings = settings
        app.state.access = auth.load_access(settings.api_keys_file)
        if not settings.auth_disabled and not app.state.access.key_hashes:
            log.warning("no API keys configured (RECSYS_API_KEYS_FILE) and auth is on: every request will get 401")
        app.state.rate_limiter = None
        if settings.rate_limit or app.state.access.rate_limits:
            app.state.rate_limiter = RateLimiter(
                settings.rate_limit,
                app.state.access.rate_limits,
                aclient,
                f"{settings.redis_prefix}:ratelimit",
                breaker=redis_breaker if aclient is not None else None,
            )
            app.state.rate_limiter.start()
        app.state.metrics = metrics
        app.state.work_quota = WorkQuota(settings.tenant_work_limit, admission) if settings.tenant_work_limit else None
        app.state.variants, app.state.impressions = va.open_experiments(settings, store, metrics.registry)
        app.state.loaders.start()
        yield
        if app.state.rate_limiter is not None:
            await app.state.rate_limiter.close()
        await app.state.loaders.close()
        await va.close_experiments(app.state.variants, app.state.impressions)  # flushes buffered impressions
        if client is not None:
            client.close()
        if aclient is not None:
            await aclose_bounded(aclient)  # imported above whenever aclient is set

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
        overload_wait_s=settings.admission_overload_wait_ms / 1e3,
        interval_s=settings.admission_interval_ms / 1e3,
        loop_lag=LoopLag(settings.admission_max_loop_lag_ms / 1e3, settings.admission_loop_lag_interval_ms / 1e3)
        if settings.admission_max_loop_lag_ms > 0 and settings.max_concurrency > 0
        else None,
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
        openapi_extra={"parameters": options_parameters()},
    )
    async def recommend(
        request: Request, tenant: TenantId, live: Live, user_id: EntityId, opts: QueryOptions
    ) -> Response:
        """Personal top-k (seen items excluded), or popular items with `fallback: true` for an unknown user.

        Filters (`category`, `tag`, their `exclude_` forms, `exclude`) never make the answer shorter
        than `k` while enough items qualify; `diversity` (MMR) or `max_per_category` re-rank.
        """
        started = time.perf_counter()  # async: the hot route pays no threadpool hop (answers.inline)
        charge(request, tenant, work_units(1, opts.k, opts.reranks))
        body = await va.recommend(request.app.state, live, tenant, user_id, opts, metrics)  # under the user's arm
        observe(tenant, "recommendations", started)
        return body

    @app.get(
        "/v1/tenants/{tenant}/items/{item_id}/similar",
        response_model=SimilarItems,
        responses=ERRORS,
        summary="Items similar to an item",
        openapi_extra={"parameters": options_parameters()},
    )
    async def similar(
        request: Request, tenant: TenantId, live: Live, item_id: EntityId, opts: QueryOptions
    ) -> Response:
        started = time.perf_counter()
        charge(request, tenant, work_units(1, opts.k, opts.reranks))
        # plain requests of a release with precomputed neighbours are a row read: on the loop;
        # a live search (a catalog scan) or filtered/re-ranked ones go to the threadpool
        if inline(opts) and (live.release.neighbors is not None or live.scoring != "dot"):
            body = similar_items(live, tenant, item_id, opts, metrics)
        else:
            body = await run_in_threadpool(similar_items, live, tenant, item_id, opts, metrics)
        observe(tenant, "similar", started)
        return json_response(body)

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
        user, degraded_by = one_user(live, tenant, user_id)
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
            degraded=metrics.degrade(tenant, degraded_by),
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
        out = va.recommend_batch(request.app.state, live, tenant, body.user_ids, body.options, metrics)
        observe(tenant, "batch", started)
        return out

    @app.post(
        "/v1/tenants/{tenant}/events",
        response_model=EventsAccepted,
        status_code=202,
        responses=POST_ERRORS,
        summary="Record interactions; recommendations react at once",
    )
    def events(
        request: Request,
        tenant: TenantId,
        live: Live,
        body: Annotated[EventsRequest, Body()],
        now: Annotated[datetime, Depends(receive_time)],
    ):
        """Appends the events to the tenant's event log under the day they arrived (the next
        extract reads them, however old their timestamps; a retry with the same event ids is
        stored once) and folds each user in (ALS: the vector's closed form; EASE, item-kNN: the
        new seen list), so their next recommendations already reflect these events without
        retraining.
        """
        started = time.perf_counter()
        charge(request, tenant, EVENT_UNITS * len(body.events))
        given = [as_utc(e.timestamp) for e in body.events]
        stamps = [s or now for s in given]
        rejected = rejected_events(stamps, now)
        bad = {r.index for r in rejected}
        keep = [i for i in range(len(body.events)) if i not in bad]
        kept = [body.events[i] for i in keep]
        df = pd.DataFrame(
            {
                "user_id": pd.Series([e.user_id for e in kept], dtype="string"),
                "item_id": pd.Series([e.item_id for e in kept], dtype="string"),
                # a client clock a little ahead (within the skew allowance) never files an event after its arrival
                "timestamp": pd.to_datetime([min(stamps[i], now) for i in keep], utc=True),
                "rating": [np.nan if e.rating is None else e.rating for e in kept],
                "event_type": pd.Series([e.event_type for e in kept], dtype="string"),
                "recommendation_id": pd.Series([e.recommendation_id for e in kept], dtype="string"),
                "position": pd.Series([e.position for e in kept], dtype="Int64"),
            }
        )
        df["event_key"] = event_log.event_keys(
            df["user_id"],
            df["item_id"],
            df["event_type"],
            pd.Series(pd.to_datetime([given[i] for i in keep], utc=True)),  # the client's own time (NaT: none)
            pd.Series([e.event_id for e in kept], dtype="string"),
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
        event_log.append(request.app.state.store, tenant, df, received_at=now)
        metrics.events.labels(tenant).inc(len(df))
        rows = live.release.item_ids.get_indexer(df["item_id"].to_numpy())
        unknown = sorted(set(df.loc[rows < 0, "item_id"]))
        folded, degraded = fold_in_events(live, tenant, df, rows, metrics)
        observe(tenant, "events", started)
        return EventsAccepted(
            tenant=tenant,
            release_id=live.release_id,
            accepted=len(df),
            users_folded_in=folded,
            unknown_item_ids=unknown,
            rejected=rejected,
            degraded=degraded,
        )

    @app.get("/healthz", response_model=Health, summary="Liveness")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Configured tenants still loading."}},
        summary="Whether the configured tenants are loaded",
    )
    def readyz(request: Request, response: Response, authorization: AdminHeader = None) -> Readiness:
        """503 until every tenant of RECSYS_SERVING_TENANTS is loaded (or has published nothing), or
        RECSYS_READY_TIMEOUT_S passed ("partial"). Tenant names and release ids: admin token only."""
        state = request.app.state
        status, loaded = state.loaders.ready(settings.ready_timeout_s)
        if status == "loading":
            response.status_code = 503
        details = state.releases.loaded() if auth.admin_allowed(settings.admin_token, authorization) else None
        return Readiness(status=status, loaded=loaded, expected=len(state.loaders.keep), tenants=details)

    @app.get("/metrics", include_in_schema=False)
    def prometheus(authorization: AdminHeader = None) -> Response:
        if settings.admin_token and not auth.admin_allowed(settings.admin_token, authorization):
            return Response("admin token required", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def unavailable(request: Request, exc: Exception) -> Response:
        """A dependency failing where no degraded answer exists (e.g. the event log's store): 503."""
        log.warning("%s %s: dependency unavailable (%s: %s)", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(
            {"detail": "a dependency is unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": str(max(1, math.ceil(settings.breaker_reset_seconds)))},
        )

    for exc_type in outage_types():
        app.add_exception_handler(exc_type, unavailable)

    return app
