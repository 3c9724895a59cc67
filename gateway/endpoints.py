"""Thin request handlers whose bodies read as the request's path."""

from __future__ import annotations

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.admit import admit, admit_request
from gateway.deps import Dependencies
from gateway.errors import ShuttingDownError, UnknownModelError
from gateway.relay import Caller, Relay
from gateway.route import CapacityError, Demand, NoWorkerError
from gateway.upstream import routing_error
from gateway.validate import InferenceJob, parse_body, validate


async def run_model(request: Request) -> Relay:
    """``POST /client/v4/accounts/{account_id}/ai/run/{model}``: the native Workers AI endpoint."""
    deps: Dependencies = request.app.state.deps
    if deps.drain.draining:
        raise ShuttingDownError()
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
    _check_capacity(job, deps)
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


def _check_capacity(job: InferenceJob, deps: Dependencies) -> None:
    """Refuse, before admission touches limits or budgets, what no worker can take now: an adapter no worker serves,
    a pool with no worker up, or (``options.rejectIfBusy``) a pool whose workers are all full."""
    model = deps.settings.models[job.model]
    pool = deps.pools[model.pool]
    try:
        pool.check(Demand(model.served_name, model.context_window_tokens, job.lora), reject_if_busy=job.reject_if_busy)
    except (NoWorkerError, CapacityError) as exc:
        raise routing_error(exc, pool.name, deps.metrics) from None


async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def ready(request: Request) -> Response:
    """Readiness: 200 while at least one model has a worker up, with each model's workers up; 503 when none has,
    or while draining for shutdown. (One pool down does not take the gateway out of service for the others.)"""
    deps: Dependencies = request.app.state.deps
    models = {}
    for name, model in deps.settings.models.items():
        pool = deps.pools[model.pool]
        demand = Demand(model.served_name, model.context_window_tokens)
        up = [worker.url for worker in pool.workers if worker.is_routable() and worker.serves(demand)]
        models[name] = {"pool": pool.name, "workers_up": len(up), "workers": len(pool.workers)}
    ready = not deps.drain.draining and any(entry["workers_up"] for entry in models.values())
    body = {"ready": ready, "draining": deps.drain.draining, "models": models}
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process."""
    deps: Dependencies = request.app.state.deps
    return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)
