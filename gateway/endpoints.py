"""Thin request handlers whose bodies read as the request's path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from billing import ApiKey
from gateway.admit import admit, admit_request
from gateway.auth import require_bearer
from gateway.deps import Dependencies
from gateway.errors import InvalidRequestError, ModelNotFoundError, ShuttingDownError, UnknownModelError
from gateway.observe import EXPOSITION_TYPE, RequestFacts, safe_observe
from gateway.openai_compat import OpenAiRequest, parse_chat, parse_completion
from gateway.relay import Caller, Relay
from gateway.route import CapacityError, Demand, NoWorkerError
from gateway.shapes import AnswerShape, OpenAiChatShape, OpenAiCompletionShape, WorkersAiShape
from gateway.upstream import routing_error
from gateway.validate import InferenceJob, parse_body, validate

_Parsed = TypeVar("_Parsed")


async def run_model(request: Request) -> Relay:
    """``POST /client/v4/accounts/{account_id}/ai/run/{model}``: the native Workers AI endpoint."""
    deps: Dependencies = request.app.state.deps
    key = await _authenticate(request, deps, request.path_params["account_id"])
    model = request.path_params["model"]
    if model not in deps.settings.models:
        raise UnknownModelError(model)
    request.state.facts.model = model
    job = await _off_loop_if_large(await request.body(), deps, lambda raw: _parse_and_validate(raw, model, deps))
    return await _serve(request, key, job, deps, lambda job, request_id, started_at: WorkersAiShape(job))


async def chat_completions(request: Request) -> Relay:
    """``POST .../ai/v1/chat/completions`` (and ``/v1/chat/completions``): OpenAI's chat API."""
    return await _openai(request, parse_chat, OpenAiChatShape)


async def completions(request: Request) -> Relay:
    """``POST .../ai/v1/completions`` (and ``/v1/completions``): OpenAI's text completions, one raw prompt."""
    return await _openai(request, parse_completion, OpenAiCompletionShape)


async def list_models(request: Request) -> Response:
    """``GET .../ai/v1/models``: the models served, with their context windows, limits and prices."""
    deps: Dependencies = request.app.state.deps
    await _authenticate(request, deps, request.path_params.get("account_id"))
    return JSONResponse({"object": "list", "data": [_model_entry(name, deps) for name in deps.settings.models]})


async def get_model(request: Request) -> Response:
    """``GET .../ai/v1/models/{model}``: one model, as listed."""
    deps: Dependencies = request.app.state.deps
    await _authenticate(request, deps, request.path_params.get("account_id"))
    model = request.path_params["model"]
    if model not in deps.settings.models:
        raise ModelNotFoundError(model)
    return JSONResponse(_model_entry(model, deps))


_ShapeFactory = Callable[[InferenceJob, str, float], AnswerShape]


async def _openai(
    request: Request,
    parse: Callable[..., OpenAiRequest],
    shape_class: type[OpenAiChatShape] | type[OpenAiCompletionShape],
) -> Relay:
    deps: Dependencies = request.app.state.deps
    key = await _authenticate(request, deps, request.path_params.get("account_id"))
    facts: RequestFacts = request.state.facts

    def parse_body_of(raw: bytes) -> OpenAiRequest:
        body = parse_body(raw)
        model = body.get("model")
        if not isinstance(model, str):
            raise InvalidRequestError("'/model' is required: the model to run, as GET /v1/models lists it")
        if model not in deps.settings.models:
            raise ModelNotFoundError(model)
        facts.model = model
        default_max_tokens = deps.settings.models[model].default_max_tokens
        return parse(body, deps.openai_schemas, default_max_tokens, forbidden_text=deps.forbidden_text)

    parsed = await _off_loop_if_large(await request.body(), deps, parse_body_of)

    def shape(job: InferenceJob, request_id: str, started_at: float) -> AnswerShape:
        return shape_class(request_id, job.model, int(started_at), include_usage=parsed.include_usage)

    return await _serve(request, key, parsed.job, deps, shape)


async def _authenticate(request: Request, deps: Dependencies, account_id: str | None) -> ApiKey:
    if deps.drain.draining:
        raise ShuttingDownError()
    key = await deps.auth.authenticate(request.headers, account_id, request.url.path, scope="inference")
    facts: RequestFacts = request.state.facts
    facts.tenant, facts.key_id = key.tenant, key.key_id
    return key


async def _off_loop_if_large(raw: bytes, deps: Dependencies, parse: Callable[[bytes], _Parsed]) -> _Parsed:
    """``parse(raw)``; a large body (its size already capped by BodySizeLimitMiddleware) takes milliseconds to parse
    and check, so it is done in a worker thread, keeping the event loop free for the streams."""
    if len(raw) < deps.settings.validation.large_body_bytes:
        return parse(raw)
    return await anyio.to_thread.run_sync(parse, raw)


async def _serve(request: Request, key: ApiKey, job: InferenceJob, deps: Dependencies, shape: _ShapeFactory) -> Relay:
    """Steps 3 to 8 for a validated job, the same on every route: capacity, admission, then the relay, which
    meters and bills in its own ``finally``."""
    facts: RequestFacts = request.state.facts
    facts.stream = job.stream
    _check_capacity(job, deps)
    admission = await admit(job, deps.settings.models[job.model], deps.counters[job.model])
    request_id = request.state.request_id
    admission, started_at, rate_headers = await admit_request(admission, key, request_id, deps)
    caller = Caller(
        request_id=request_id, tenant=key.tenant, key_id=key.key_id, started_at=started_at, headers=rate_headers
    )
    return Relay(admission, caller, deps, shape(admission.job, request_id, started_at), facts)


def _parse_and_validate(raw: bytes, model: str, deps: Dependencies) -> InferenceJob:
    settings = deps.settings.models[model]
    return validate(
        parse_body(raw), model, deps.schemas[model], settings.default_max_tokens, forbidden_text=deps.forbidden_text
    )


def _model_entry(name: str, deps: Dependencies) -> dict[str, Any]:
    model = deps.settings.models[name]
    pool = deps.pools[model.pool]
    demand = Demand(model.served_name, model.context_window_tokens)
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "tollgate",
        "context_window": model.context_window_tokens,
        "max_tokens": model.max_tokens_limit,
        "default_max_tokens": model.default_max_tokens,
        "pricing": {
            "prompt_nano_usd_per_token": model.prompt_nano_usd_per_token,
            "completion_nano_usd_per_token": model.completion_nano_usd_per_token,
        },
        "available": any(worker.is_routable() and worker.serves(demand) for worker in pool.workers),
    }


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
    """Prometheus metrics of this replica (all its processes); with ``metrics.token`` set, for its bearer only."""
    deps: Dependencies = request.app.state.deps
    if deps.settings.metrics.token:
        require_bearer(request.headers, deps.settings.metrics.token)
    safe_observe(deps.sampler.sample)  # this process's view of the workers, as of now
    body = await anyio.to_thread.run_sync(deps.metrics.exposition)  # multiprocess mode reads files
    return Response(body, media_type=EXPOSITION_TYPE)
