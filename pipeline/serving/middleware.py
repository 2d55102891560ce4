"""Reject malformed tenant ids from the RAW path, before routing.

Starlette routes on the percent-decoded path, so `/v1/tenants/a%2F..%2Fb/...` would be
split at the decoded `/` and answered 404 by the router instead of being refused as a bad
tenant id. This guard decodes the raw segment after `/v1/tenants/` itself and answers 422,
in FastAPI's validation-error shape, for anything that is not a tenant id. No storage call
can see such an id.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

from pipeline.config import TENANT_ID_PATTERN, is_valid_tenant_id

PREFIX = b"/v1/tenants/"


class TenantPathGuard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode()
            raw = raw.split(b"?", 1)[0]
            if raw.startswith(PREFIX):
                segment = raw[len(PREFIX) :].split(b"/", 1)[0]
                tenant = unquote(segment.decode("latin-1"), encoding="utf-8", errors="replace")
                if not is_valid_tenant_id(tenant):
                    await _reject(send, tenant)
                    return
        await self.app(scope, receive, send)


async def _reject(send, tenant: str) -> None:
    body = json.dumps(
        {
            "detail": [
                {
                    "type": "string_pattern_mismatch",
                    "loc": ["path", "tenant"],
                    "msg": f"String should match pattern '{TENANT_ID_PATTERN}'",
                    "input": tenant[:64],
                }
            ]
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 422,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
