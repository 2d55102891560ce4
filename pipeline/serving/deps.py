"""FastAPI dependencies: tenant id validation, API-key auth, rate limits, the live release.

Everything comes from `request.app.state` (filled in lifespan), so tests override
dependencies or settings instead of patching modules. The tenant id is validated by its
path pattern before any of these run, so no storage call ever sees an invalid id.

The dependencies are async: a sync dependency costs a threadpool hop per request (CPU of
the order of the search itself). They do no I/O: the rate limiter counts in memory and
shares the counts through Redis in the background (rate_limit.py); pointer polls and loads
run in per-tenant background tasks.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, get_origin

from fastapi import Depends, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from pydantic import ValidationError

from pipeline.config import TENANT_ID_PATTERN
from pipeline.serving import auth
from pipeline.serving.live import LiveRelease
from pipeline.serving.schemas import Options

MAX_K = 100
TenantId = Annotated[
    str,
    Path(pattern=TENANT_ID_PATTERN, description="Tenant id, [a-z0-9][a-z0-9-]{0,39}.", examples=["demo"]),
]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Number of items, 1..100.")]
EntityId = Annotated[str, Path(min_length=1, max_length=256, description="A user or item id of the tenant.")]
# declared as an OpenAPI security scheme, so clients and the schemathesis test send the key
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="The tenant's API key.")


async def authorize(
    tenant: TenantId,
    request: Request,
    x_api_key: Annotated[str | None, Security(API_KEY)] = None,
) -> str:
    state = request.app.state
    if not state.settings.auth_disabled:
        if not x_api_key:
            raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})
        if not auth.key_allowed(state.access.key_hashes, tenant, x_api_key):
            raise HTTPException(403, f"this key is not valid for tenant {tenant!r}")
    if state.rate_limiter is not None:
        retry = state.rate_limiter.check(tenant)  # in memory; flushed to Redis in the background
        if retry is not None:
            state.metrics.rate_limited.labels(tenant).inc()
            raise HTTPException(
                429, f"rate limit of tenant {tenant!r} exceeded", headers={"Retry-After": str(max(1, round(retry)))}
            )
    return tenant


async def live_release(request: Request, tenant: Annotated[str, Depends(authorize)]) -> LiveRelease:
    """The tenant's live release, read without I/O; polls and loads run in `loader.Loaders`.

    Nothing loaded yet: wait for this tenant's first poll only (bounded), then 404 if the
    tenant has definitely published nothing, else 503 with Retry-After (store or Redis down,
    release unloadable, load still running).
    """
    state = request.app.state
    live = state.releases.current(tenant)
    if live is not None:
        state.loaders.ensure(tenant)  # keeps its poll loop alive (a dict lookup)
        return live
    live = await state.loaders.wait_first(tenant, state.settings.cold_wait_seconds)
    if live is not None:
        return live
    outcome = state.releases.outcome(tenant)
    if outcome == "absent":
        raise HTTPException(404, f"unknown tenant {tenant!r} (no published release)")
    state.metrics.unavailable.labels(tenant, outcome).inc()
    retry = max(1, math.ceil(state.settings.breaker_reset_seconds))
    raise HTTPException(
        503,
        f"tenant {tenant!r} has no release loaded yet ({outcome}); retry later",
        headers={"Retry-After": str(retry)},
    )


Live = Annotated[LiveRelease, Depends(live_release)]


def receive_time() -> datetime:
    """When the API received a request: the event log files events under this day. A dependency
    so tests can set the clock (`app.dependency_overrides[receive_time]`)."""
    return datetime.now(UTC)


def as_utc(stamp: datetime | None) -> datetime | None:
    """A naive client timestamp is UTC (as the API documents)."""
    return stamp if stamp is None or stamp.tzinfo else stamp.replace(tzinfo=UTC)


LIST_OPTIONS = frozenset(name for name, f in Options.model_fields.items() if get_origin(f.annotation) is list)


def options_parameters() -> list[dict[str, Any]]:
    """`Options` as OpenAPI query parameters (what FastAPI writes for a query model), for the
    routes that parse it with `query_options` (their `openapi_extra`)."""
    schema = Options.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": prop, "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]


async def query_options(request: Request) -> Options:
    """The query string as `Options`: one pydantic validation of the whole model.

    Same rules and errors as `Annotated[Options, Query()]` (422, `loc` under "query", unknown
    parameters refused, repeated parameters as lists, a repeated scalar's last value), at a
    fraction of the cost: FastAPI validates a query model field by field in Python, about a
    third of the hot route's CPU on the serving benchmark (cProfile).
    """
    params = request.query_params
    if not params:
        return Options()
    data: dict[str, Any] = {}
    for name, value in params.multi_items():
        if name in LIST_OPTIONS:
            data.setdefault(name, []).append(value)
        else:
            data[name] = value
    try:
        return Options.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


QueryOptions = Annotated[Options, Depends(query_options)]
