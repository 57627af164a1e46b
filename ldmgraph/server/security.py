"""Request guards, as plain ASGI middleware (they see websockets too), and what keeps server paths in.

* Token: when the server has one (required off loopback), every request must carry it, as
  ``Authorization: Bearer T``, a ``token`` query parameter, or the cookie that a page loaded
  with ``?token=T`` receives (so the editor's own requests and its websocket carry it).
* Host: the ``Host`` header must name the bound address (any loopback name when bound to
  loopback) or a name given with ``--allow-host``; a page on a DNS-rebound name (the attacker's
  name, resolving to 127.0.0.1) sends its own name and is refused.
* Origin: a browser request whose ``Origin`` is neither this server nor an allowed CORS origin
  is refused, so another web page cannot drive a server on the user's machine. ``Origin: null``
  (sandboxed iframes, ``file://`` pages, some redirects) is refused on every state-changing
  request and on the websocket: such a page could otherwise interrupt jobs, upload, or write
  settings and the editor's ``user.css``.
* Body size: bodies over the limit are refused with 413 before they are read to the end.
* Paths: :func:`path_redactor` rewrites absolute server paths in messages that leave the server
  (error messages, tracebacks, logs) as ``<data>/...``, ``<bundled models>/...`` or ``.../name``.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
COOKIE = "ldmgraph_token"
BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces or control characters


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

    def __init__(self, app: ASGIApp, token: str | None, allowed_origins: tuple[str, ...],
                 bound_host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.token = token
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins}
        self.hosts = HostCheck(bound_host, allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        if not self.hosts.allows(host):
            await _reject(scope, send, 403, "forbidden_host",
                          f"Host {host[:80]!r} is not this server's address; start the server with "
                          "--allow-host NAME to accept that name")
            return
        origin = headers.get("origin")
        changes_state = scope["type"] == "websocket" or scope.get("method") not in SAFE_METHODS
        if origin == "null" and changes_state:
            await _reject(scope, send, 403, "forbidden_origin",
                          "requests from pages without an origin (Origin: null: sandboxed frames, file:// "
                          "pages) may not change anything here")
            return
        if origin and origin != "null" and not self._origin_ok(origin, host):
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


class HostCheck:
    """Which ``Host`` headers name this server: the bound address, loopback names when bound to
    loopback, any IP address when bound to all interfaces (a token is required there), and the
    names given with ``--allow-host``. The port is not compared (proxies may rewrite it)."""

    def __init__(self, bound: str, allowed: tuple[str, ...]) -> None:
        self.bound = bound.strip("[]").lower()
        self.allowed = {name.strip("[]").lower().rstrip(".") for name in allowed}
        self.any_address = self.bound in ("0.0.0.0", "::", "")

    def allows(self, header: str) -> bool:
        name = _host_name(header)
        if name is None:
            return False
        if name in self.allowed or name == self.bound:
            return True
        if _is_loopback(self.bound) or self.any_address:
            if name in LOOPBACK_NAMES or _is_loopback(name):
                return True
        return self.any_address and _is_ip(name)


def _host_name(header: str) -> str | None:
    """The name of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case; None if malformed."""
    header = header.strip().lower()
    if not header:
        return None
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else None
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def client_id_ok(client_id: str | None) -> bool:
    """A websocket client id (and a job's ``client_id``): printable ASCII, 1-200 characters; ids with
    control characters would be written into logs and messages as they are."""
    return client_id is None or bool(CLIENT_ID.match(client_id))


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


# -- server paths out of messages -------------------------------------------------------------------
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:[^\s/'\"<>:]+/)+([^\s/'\"<>:,;)]*)")


def path_redactor(labels: dict[Path, str]) -> Callable[[Any], Any]:
    """A function that rewrites absolute server paths in a JSON-like value's strings: the folders in
    ``labels`` (both as given and resolved) become their labels (``<data>/input/x.png``), the
    Python installation and the package ``<python>`` and ``<ldmgraph>``, and any other absolute
    path its last part (``.../name``). Error messages and tracebacks name files, not where the
    server keeps them."""
    import ldmgraph

    roots: dict[str, str] = {}
    package = Path(ldmgraph.__file__).resolve().parent
    folders = {**labels, package: "<ldmgraph>", Path(sys.prefix): "<python>", Path(sys.base_prefix): "<python>",
               Path.home(): "~"}
    for folder, label in folders.items():
        for form in (str(folder), str(folder.resolve()), os.path.abspath(folder)):
            if len(form) > 1:
                roots.setdefault(form.rstrip("/"), label)
    ordered = sorted(roots.items(), key=lambda item: -len(item[0]))
    pattern = re.compile("|".join(re.escape(root) + r"(?=/|\b|$)" for root, _ in ordered))
    lookup = dict(ordered)

    def text(value: str) -> str:
        value = pattern.sub(lambda m: lookup[m.group(0)], value)
        return ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), value)

    def redact(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        if isinstance(value, list | tuple):
            return [redact(v) for v in value]
        if isinstance(value, dict):
            return {k: redact(v) for k, v in value.items()}
        return value

    return redact


class LogBuffer(logging.Handler):
    """The last log records in memory, for ComfyUI's ``/internal/logs`` (its editor's log panel),
    paths redacted."""

    LIMIT = 500

    def __init__(self, redact: Callable[[Any], Any]) -> None:
        super().__init__(logging.INFO)
        self.redact = redact
        self.entries: collections.deque[dict[str, str]] = collections.deque(maxlen=self.LIMIT)

    @classmethod
    def install(cls, redact: Callable[[Any], Any]) -> LogBuffer:
        handler = cls(redact)
        for name in ("ldmgraph", "uvicorn.error"):
            logging.getLogger(name).addHandler(handler)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            self.entries.append({"t": f"{stamp}.{int(record.msecs):03d}",
                                 "m": self.redact(f"{record.levelname}: {record.getMessage()}\n")})
        except Exception:  # noqa: BLE001 - logging never breaks the server
            self.handleError(record)
