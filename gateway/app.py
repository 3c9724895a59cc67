"""The ASGI application: routes, middleware order, exception handlers and lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from config import Settings, load_pools, load_settings
from gateway import admin, dashboard
from gateway.deps import Dependencies, build_dependencies
from gateway.endpoints import (
    chat_completions,
    completions,
    get_model,
    health,
    list_models,
    metrics,
    ready,
    run_model,
)
from gateway.errors import MethodNotAllowedError, RouteNotFoundError, TollgateError, is_openai_path, render_error
from gateway.middleware import BodySizeLimitMiddleware, ObserveMiddleware, RequestIdMiddleware
from gateway.observe import RequestFacts

logger = logging.getLogger(__name__)


def create_app(settings: Settings, deps: Dependencies | None = None) -> Starlette:
    """Build the gateway.

    Usage::

        app = create_app(load_settings())             # production: builds its own dependencies
        app = create_app(settings, deps=test_deps)    # tests: bring a Redis, a tokenizer, fake workers

    The lifespan only closes what was built here; nothing is created only in it, so the app also runs under
    transports that skip the lifespan (httpx's ``ASGITransport``).
    """
    deps = deps or build_dependencies(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        deps.start()
        try:
            yield
        finally:
            await deps.aclose()

    routes = []
    for prefix in ("/client/v4", ""):  # the SDK appends /accounts/... to whatever base_url it is given
        routes.append(Route(prefix + "/accounts/{account_id}/ai/run/{model:path}", run_model, methods=["POST"]))
        routes += _openai_routes(prefix + "/accounts/{account_id}/ai/v1")
    routes += _openai_routes("/v1")  # for clients that only set a base URL: the account is the key's
    routes += admin.routes()
    routes += dashboard.routes()
    routes.append(Route("/healthz", health, methods=["GET"]))
    routes.append(Route("/readyz", ready, methods=["GET"]))
    routes.append(Route("/metrics", metrics, methods=["GET"]))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(ObserveMiddleware, metrics=deps.metrics),
            Middleware(BodySizeLimitMiddleware, max_body_bytes=settings.server.max_body_bytes),
        ],
        exception_handlers={
            TollgateError: _handle_tollgate_error,
            HTTPException: _handle_http_exception,
            Exception: _handle_unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.deps = deps
    return app


def _openai_routes(base: str) -> list[Route]:
    return [
        Route(base + "/chat/completions", chat_completions, methods=["POST"]),
        Route(base + "/completions", completions, methods=["POST"]),
        Route(base + "/models", list_models, methods=["GET"]),
        Route(base + "/models/{model:path}", get_model, methods=["GET"]),
    ]


def create_app_from_environment() -> Starlette:
    """The factory ``tollgate serve`` hands uvicorn: settings from ``TOLLGATE_CONFIG`` and ``TOLLGATE_*``; the pools
    are re-read from there while running."""
    settings = load_settings()
    deps = build_dependencies(
        settings,
        pool_source=lambda: load_pools(settings),
        metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,  # set by `tollgate serve` for its processes
    )
    return create_app(settings, deps)


async def _handle_tollgate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TollgateError)
    facts: RequestFacts | None = getattr(request.state, "facts", None)
    if facts is not None:
        facts.error_code = exc.code
    return render_error(exc, openai=is_openai_path(request.url.path))


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    openai = is_openai_path(request.url.path)
    if exc.status_code == 405:
        return render_error(MethodNotAllowedError(), openai=openai)
    return render_error(RouteNotFoundError(request.url.path), openai=openai)  # routing raises only 404 and 405


async def _handle_unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return render_error(TollgateError(), openai=is_openai_path(request.url.path))
