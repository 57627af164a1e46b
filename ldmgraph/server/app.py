"""The ASGI application: routes at ComfyUI's paths and under ``/api``, guards, and the editor's files.

FastAPI builds the OpenAPI document (``/openapi.json``, docs page at ``/docs``) from the request
models in :mod:`ldmgraph.server.api`. Every error is JSON in ComfyUI's shape ``{error: {type,
message, details, extra_info}, node_errors}``; a malformed request is a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from . import api, frontend
from .protocol import request_error
from .security import BodyLimit, Guard
from .state import ServerState

log = logging.getLogger("ldmgraph.server")


def create_app(state: ServerState) -> FastAPI:
    """The application for one server state; the worker starts with the application."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.hub.attach(asyncio.get_running_loop())
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()
            state.store.close()

    app = FastAPI(title="ldmgraph server", version="1",
                  description="ComfyUI's HTTP and websocket protocol on a persistent queue, plus saved "
                              "workflows and jobs by id. Every route is also served without the /api prefix.",
                  lifespan=lifespan)
    for router in (api.build_router(state), frontend.build_router(state)):
        app.include_router(router, prefix="/api")
        app.include_router(router, include_in_schema=False)
    app.include_router(frontend.build_root_router(state))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()[:10]
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in problems)
        return JSONResponse(request_error("invalid_request", text or "invalid request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(request_error("http_error", str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    static = frontend.frontend_static() if state.config.frontend else None
    if static is not None:
        app.mount("/", StaticFiles(directory=static, html=True), name="editor")
    else:
        @app.get("/", include_in_schema=False)
        def no_editor() -> dict[str, Any]:
            return {"ldmgraph": "server", "editor": "not installed: pip install 'ldmgraph[ui]'",
                    "docs": "/docs", "openapi": "/openapi.json"}

    if state.config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)
    app.add_middleware(Guard, token=state.config.token, allowed_origins=state.config.cors_origins,
                       bound_host=state.config.host, allowed_hosts=state.config.allowed_hosts)
    return app


class JsonBodies:
    """Read every request body that is not a form as JSON, whatever its Content-Type says.

    ComfyUI reads its JSON endpoints with ``await request.json()``, which ignores the header, and
    its clients rely on that: its own script examples post JSON with urllib's default
    ``application/x-www-form-urlencoded``, client libraries with none or ``application/octet-stream``.
    FastAPI parses a body model only under a JSON Content-Type, so the header is set to JSON here
    for every body but multipart forms (the uploads).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            kind = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-type"), b"")
            if not kind.lower().startswith(b"multipart/"):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
