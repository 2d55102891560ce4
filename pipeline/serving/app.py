"""The recommendation API: `create_app(settings)`; clients opened in `lifespan`.

Routes are thin: validate the tenant id (pattern, before any storage call), authenticate,
take ONE live release reference, answer from it. Unknown users get the release's popular
items with fallback=true, never a 500.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from pipeline.config import Settings, get_settings
from pipeline.serving import auth
from pipeline.serving.deps import EntityId, K, Live, TenantId
from pipeline.serving.releases import LiveRelease, ReleaseCache
from pipeline.serving.schemas import Health, Readiness, Recommendations, ScoredItem, SimilarItems
from pipeline.storage import open_store

log = logging.getLogger(__name__)


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
            "recsys_fallbacks_total",
            "Responses served from the fallback list",
            ["tenant", "reason"],
            registry=self.registry,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

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
        app.state.releases = ReleaseCache(
            open_store(settings.artifact_root), redis_users, settings.release_poll_seconds
        )
        app.state.settings = settings
        app.state.key_hashes = auth.load_key_hashes(settings.api_keys_file)
        if not settings.auth_disabled and not app.state.key_hashes:
            log.warning("no API keys configured (RECSYS_API_KEYS_FILE) and auth is on: every request will get 401")
        app.state.metrics = Metrics()
        yield
        if client is not None:
            client.close()

    app = FastAPI(
        title="recsys-pipeline serving",
        version="1",
        lifespan=lifespan,
        description="Recommendations from each tenant's published release.",
    )

    def items_of(live: LiveRelease, rows: np.ndarray, scores: np.ndarray) -> list[ScoredItem]:
        ids = live.release.item_ids
        return [ScoredItem(item_id=ids[r], score=float(s)) for r, s in zip(rows, scores, strict=True)]

    @app.get(
        "/v1/tenants/{tenant}/users/{user_id}/recommendations",
        response_model=Recommendations,
        responses={401: {}, 403: {}, 404: {}},
    )
    def recommend(request: Request, tenant: TenantId, live: Live, user_id: EntityId, k: K = 10) -> Recommendations:
        started = time.perf_counter()
        user = live.users.user(live.release, user_id)
        if user is None:
            pop = live.release.popular[:k]
            counts = live.release.item_popularity
            scores = counts[pop] / max(float(counts.max()), 1.0) if len(pop) else np.array([])
            body = Recommendations(
                tenant=tenant,
                user_id=user_id,
                release_id=live.release_id,
                recommendation_id=uuid.uuid4().hex,
                fallback=True,
                fallback_reason="unknown_user",
                items=items_of(live, pop, scores),
            )
            request.app.state.metrics.fallbacks.labels(tenant, "unknown_user").inc()
        else:
            vector, seen = user
            rows, scores = live.search(vector, k, exclude=seen)
            body = Recommendations(
                tenant=tenant,
                user_id=user_id,
                release_id=live.release_id,
                recommendation_id=uuid.uuid4().hex,
                fallback=False,
                items=items_of(live, rows, scores),
            )
        request.app.state.metrics.latency.labels(tenant, "recommendations").observe(time.perf_counter() - started)
        return body

    @app.get(
        "/v1/tenants/{tenant}/items/{item_id}/similar",
        response_model=SimilarItems,
        responses={401: {}, 403: {}, 404: {}},
    )
    def similar(request: Request, tenant: TenantId, live: Live, item_id: EntityId, k: K = 10) -> SimilarItems:
        started = time.perf_counter()
        row = live.release.item_ids.get_indexer([item_id])[0]
        if row < 0:
            raise HTTPException(404, f"unknown item {item_id!r} for tenant {tenant!r}")
        rows, scores = live.search(live.release.item_vectors[row], k, exclude=np.array([row]))
        request.app.state.metrics.latency.labels(tenant, "similar").observe(time.perf_counter() - started)
        return SimilarItems(
            tenant=tenant,
            item_id=item_id,
            release_id=live.release_id,
            recommendation_id=uuid.uuid4().hex,
            items=items_of(live, rows, scores),
        )

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness)
    def readyz(request: Request) -> Readiness:
        return Readiness(status="ok", tenants=request.app.state.releases.loaded())

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
