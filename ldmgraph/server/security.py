"""Request guards, as plain ASGI middleware (they see websockets too): token, origin, body size.

* Token: when the server has one (required off loopback), every request must carry it, as
  ``Authorization: Bearer T``, a ``token`` query parameter, or the cookie that a page loaded
  with ``?token=T`` receives (so the editor's own requests and its websocket carry it).
* Origin: a browser request whose ``Origin`` is neither this server nor an allowed CORS origin
  is refused, so another web page cannot drive a server on the user's machine.
* Body size: bodies over the limit are refused with 413 before they are read to the end.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
COOKIE = "ldmgraph_token"
BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}


async def _reject(scope: Scope, send: Send, status: int, kind: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": {"type": kind, "message": message, "details": "", "extra_info": {}},
                       "node_errors": {}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class Guard:
    """Token and origin checks for every HTTP request and websocket."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_origins: tuple[str, ...]) -> None:
        self.app = app
        self.token = token
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        origin = headers.get("origin")
        if origin and origin != "null" and not self._origin_ok(origin, headers.get("host", "")):
            await _reject(scope, send, 403, "forbidden_origin",
                          f"requests from {origin[:80]} are not allowed; start the server with --cors-origin")
            return
        if self.token is None or (scope.get("method") == "OPTIONS" and origin):  # CORS preflight
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = (query.get("token") or [None])[0]
        offered = [from_query, _bearer(headers.get("authorization")), _cookie(headers.get("cookie"))]
        if not any(t is not None and hmac.compare_digest(t.encode(), self.token.encode()) for t in offered):
            await _reject(scope, send, 401, "unauthorized",
                          "missing or wrong token: send 'Authorization: Bearer <token>' or ?token=<token>")
            return
        if from_query is not None and scope["type"] == "http":
            send = _with_cookie(send, self.token)
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        if origin.rstrip("/") in self.allowed_origins:
            return True
        return urlsplit(origin).netloc.lower() == host.lower()


def _bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None


def _cookie(value: str | None) -> str | None:
    for part in (value or "").split(";"):
        name, _, content = part.strip().partition("=")
        if name == COOKIE:
            return content
    return None


def _with_cookie(send: Send, token: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode()
            message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
        await send(message)

    return wrapped


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in BODYLESS:
            await self.app(scope, receive, send)
            return
        length = _headers(scope).get("content-length")
        too_big = f"request body larger than {self.max_bytes} bytes (--max-body-mb)"
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _reject(scope, send, 413, "request_too_large", too_big)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reject(scope, send, 413, "request_too_large", too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
