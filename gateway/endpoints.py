"""Thin request handlers whose bodies read as the request's path."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.deps import Dependencies
from gateway.errors import UnknownModelError
from gateway.relay import Caller, Relay
from gateway.validate import parse_body, validate


async def run_model(request: Request) -> Relay:
    """``POST /client/v4/accounts/{account_id}/ai/run/{model}``: the native Workers AI endpoint."""
    deps: Dependencies = request.app.state.deps
    key = await deps.auth.authenticate(request.headers, request.path_params["account_id"], request.url.path)
    model = request.path_params["model"]
    if model not in deps.settings.models:
        raise UnknownModelError(model)
    body = parse_body(await request.body())  # size already capped by BodySizeLimitMiddleware
    job = validate(body, model, deps.schemas[model], deps.settings.models[model].default_max_tokens)
    caller = Caller(request_id=request.state.request_id, tenant=key.tenant, key_id=key.key_id, started_at=deps.clock())
    return Relay(job, caller, deps)  # meters and bills in its own finally


async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP."""
    return Response(b'{"status":"ok"}', media_type="application/json")
