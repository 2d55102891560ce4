"""FastAPI dependencies: tenant id validation, API-key auth, the live release of a request.

Everything comes from `request.app.state` (filled in lifespan), so tests override
dependencies or settings instead of patching modules.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Path, Query, Request

from pipeline.config import TENANT_ID_PATTERN
from pipeline.serving import auth
from pipeline.serving.releases import LiveRelease

MAX_K = 100
TenantId = Annotated[str, Path(pattern=TENANT_ID_PATTERN, description="Tenant id, [a-z0-9][a-z0-9-]{0,39}.")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Number of items, 1..100.")]
EntityId = Annotated[str, Path(min_length=1, max_length=256)]


def authorize(
    tenant: TenantId,
    request: Request,
    x_api_key: Annotated[str | None, Header(description="The tenant's API key.")] = None,
) -> str:
    if request.app.state.settings.auth_disabled:
        return tenant
    if not x_api_key:
        raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})
    if not auth.key_allowed(request.app.state.key_hashes, tenant, x_api_key):
        raise HTTPException(403, f"this key is not valid for tenant {tenant!r}")
    return tenant


def live_release(request: Request, tenant: Annotated[str, Depends(authorize)]) -> LiveRelease:
    live = request.app.state.releases.get(tenant)
    if live is None:
        raise HTTPException(404, f"unknown tenant {tenant!r} (no published release)")
    return live


Live = Annotated[LiveRelease, Depends(live_release)]
