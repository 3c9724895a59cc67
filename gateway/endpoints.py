"""Thin request handlers whose bodies read as the request's path."""

from __future__ import annotations

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from gateway.admit import admit, admit_request
from gateway.deps import Dependencies
from gateway.errors import UnknownModelError
from gateway.relay import Caller, Relay
from gateway.validate import InferenceJob, parse_body, validate


async def run_model(request: Request) -> Relay:
    """``POST /client/v4/accounts/{account_id}/ai/run/{model}``: the native Workers AI endpoint."""
    deps: Dependencies = request.app.state.deps
    key = await deps.auth.authenticate(
        request.headers, request.path_params["account_id"], request.url.path, scope="inference"
    )
    model = request.path_params["model"]
    if model not in deps.settings.models:
        raise UnknownModelError(model)
    raw = await request.body()  # size already capped by BodySizeLimitMiddleware
    if len(raw) < deps.settings.validation.large_body_bytes:
        job = _parse_and_validate(raw, model, deps)
    else:  # a large body takes milliseconds to parse and check: keep the event loop free for the streams
        job = await anyio.to_thread.run_sync(_parse_and_validate, raw, model, deps)
    admission = await admit(job, deps.settings.models[model], deps.counters[model])
    request_id = request.state.request_id
    admission, started_at, rate_headers = await admit_request(admission, key, request_id, deps)
    caller = Caller(
        request_id=request_id, tenant=key.tenant, key_id=key.key_id, started_at=started_at, headers=rate_headers
    )
    return Relay(admission, caller, deps)  # meters and bills in its own finally


def _parse_and_validate(raw: bytes, model: str, deps: Dependencies) -> InferenceJob:
    settings = deps.settings.models[model]
    return validate(
        parse_body(raw), model, deps.schemas[model], settings.default_max_tokens, forbidden_text=deps.forbidden_text
    )


async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process."""
    deps: Dependencies = request.app.state.deps
    return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)
