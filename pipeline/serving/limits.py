"""Bounded input, enforced before the application reads a byte of the body.

`BodyLimit` (ASGI middleware, outermost after the tenant-path guard):

* a `Content-Length` above `RECSYS_MAX_BODY_BYTES` is answered 413 at once, the body unread;
* a body without a length (chunked) is read here, counted, and cut at the limit with a 413;
  below the limit it is replayed to the application (at most the limit is ever buffered);
* on `/v1/tenants/{tenant}/...` POSTs the API key is checked HERE, before the body is read or
  parsed: FastAPI parses a route's JSON body before it runs the route's dependencies, so a bad
  key with a huge or invalid body would otherwise get 400/422 (and cost the parse) instead of
  401/403. The `authorize` dependency still runs for every route (and documents the scheme).

Why hand-rolled: Starlette and uvicorn have no request-size limit (uvicorn's
`h11_max_incomplete_event_size` bounds headers only); the check is a header comparison plus a
byte counter. Batch size, k, the re-ranking pool and events per request are bounded by the
request models (`schemas.py`, visible in the OpenAPI document), and so is their product
(`schemas.work_units`, users x candidates), which the per-tenant work quota charges too.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

from pipeline.serving import auth

TENANT_PREFIX = b"/v1/tenants/"


async def send_error(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


class BodyLimit:
    def __init__(self, app, max_bytes: int, access_of=None) -> None:
        """`access_of()` returns the app's `auth.Access` (None: auth disabled); looked up per
        request because lifespan fills it after the middleware stack is built."""
        self.app = app
        self.max_bytes = max_bytes
        self.access_of = access_of

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, 400, "Content-Length is not a number")
                return
            if declared > self.max_bytes:
                await send_error(send, 413, f"request body of {declared} bytes is over the limit of {self.max_bytes}")
                return
        if not await self._authorized(scope, send):
            return
        if length is None and _header(scope, b"transfer-encoding") is not None:
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # client went away
                    return
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    await send_error(send, 413, f"request body over the limit of {self.max_bytes} bytes")
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replayed():
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, send)
            return
        await self.app(scope, receive, send)

    async def _authorized(self, scope, send) -> bool:
        """401/403 for a tenant route's POST before its body is read (see the module docstring)."""
        access = self.access_of() if self.access_of is not None else None
        raw = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
        if access is None or not raw.startswith(TENANT_PREFIX):
            return True
        tenant = unquote(raw[len(TENANT_PREFIX) :].split(b"/", 1)[0].decode("latin-1"))
        key = _header(scope, b"x-api-key")
        if not key:
            await send_error(send, 401, "missing X-API-Key header", [(b"www-authenticate", b"ApiKey")])
            return False
        if not auth.key_allowed(access.key_hashes, tenant, key.decode("latin-1")):
            await send_error(send, 403, f"this key is not valid for tenant {tenant!r}")
            return False
        return True
