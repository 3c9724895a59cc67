"""A simulated vLLM worker: Starlette speaking vLLM v0.11's OpenAI-compatible API closely enough that a gateway
written against real vLLM cannot tell the difference (``shared/spec/upstream-vllm.md`` §1-4, 6-7).

Used by ``tollgate dev``, the tests and the benchmarks in place of a GPU worker. Prompt tokens are counted with
`billing.tokens`, exactly as the worker counts them; the answers are real Llama 3 tokens cut from a built-in corpus,
paced like a decoder, at most ``max_num_seqs`` at a time (the rest wait in line), and faults can be injected at
runtime through ``/sim/faults``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``POST /tokenize``, ``GET /metrics``; and, for tests and operators, ``GET``/``PUT /sim/faults`` and
``GET``/``DELETE /sim/served`` (one record per generation request).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from billing.prompts import JinjaChatTemplate, PromptCounter
from billing.tokens import BEGIN_OF_TEXT, ChatTemplateError, Tokenizer, render_chat_prompt
from gateway.sim._answer import AnswerWriter
from gateway.sim._config import Faults, SimConfig
from gateway.sim._corpus import CORPUS
from gateway.sim._delivery import Delivery, send_whole_answer, stream_answer
from gateway.sim._exchange import RAW_SEND_SCOPE_KEY, ClientWatch, Exchange, Tally
from gateway.sim._frames import ChatFrames, CompletionFrames, chat_completion_body, completion_body
from gateway.sim._metrics import SimMetrics
from gateway.sim._requests import Job, RequestError, parse_chat, parse_completion, resolve_model

__all__ = ["Faults", "SimConfig", "create_sim_app"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Runtime:
    """Everything the endpoints share; ``faults``, ``served``, the batch and the metrics are the mutable parts."""

    config: SimConfig
    tokenizer: Tokenizer
    counter: PromptCounter
    writer: AnswerWriter
    faults: Faults
    served: list[dict[str, Any]]
    registry: CollectorRegistry
    metrics: SimMetrics
    batch: _Batch


class _Batch:
    """The running generations, at most ``capacity`` of them (0: no limit) as ``vllm serve --max-num-seqs``.

    Requests beyond that wait in arrival order; a request that ends hands its place straight to the longest waiting
    one. Both counts go to the metrics on every change.
    """

    def __init__(self, capacity: int, metrics: SimMetrics) -> None:
        self._capacity = capacity
        self._metrics = metrics
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def join(self, client_gone: Callable[[], Awaitable[None]]) -> bool:
        """Wait for a place in the batch; False, holding none, if ``client_gone()`` returns first.

        On True the caller must `leave` once its generation is over, whatever the outcome.
        """
        if not self._waiting and (self._capacity == 0 or self._running < self._capacity):
            self._running += 1
            self._report()
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._report()
        gone = asyncio.ensure_future(client_gone())
        joined = False
        try:
            await asyncio.wait((turn, gone), return_when=asyncio.FIRST_COMPLETED)
            joined = not gone.done()
        finally:  # also on cancellation, which may come after the turn was handed over
            gone.cancel()
            if not joined:
                self._give_up(turn)
        return joined

    def leave(self) -> None:
        """End a generation admitted by `join`: its place goes to the longest waiting request, if any."""
        if self._waiting:
            self._waiting.popleft().set_result(None)  # the place changes hands: still as many running
        else:
            self._running -= 1
        self._report()

    def _give_up(self, turn: asyncio.Future[None]) -> None:
        if turn.done():  # handed a place meanwhile: pass it on
            self.leave()
        else:
            self._waiting.remove(turn)
            self._report()

    def _report(self) -> None:
        self._metrics.set_load(running=self._running, waiting=len(self._waiting))


class _SimApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND_SCOPE_KEY] = send  # before the middleware wraps it; see Exchange.drop_connection
        await super().__call__(scope, receive, send)


def create_sim_app(config: SimConfig, tokenizer: Tokenizer | None = None, faults: Faults | None = None) -> Starlette:
    """Build a simulated vLLM worker.

    ```python
    app = create_sim_app(SimConfig(tokens_per_second=0, completion_tokens=5))
    app.state.faults.error_rate = 0.5  # or PUT /sim/faults {"error_rate": 0.5}
    app.state.served                   # one record per generation request, as GET /sim/served
    ```

    Parameters:
        config: served names, context window, pacing, answer length and batch capacity.
        tokenizer: the Llama 3 tokenizer; ``None`` loads `Tokenizer.default()` (about a second).
        faults: the initial fault knobs, kept and changed in place by ``PUT /sim/faults``; ``None`` means none.
    """
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.default()
    registry = CollectorRegistry(auto_describe=True)
    metrics = SimMetrics(registry, config.served_model_names[0], config.max_model_len)
    runtime = _Runtime(
        config=config,
        tokenizer=tokenizer,
        counter=PromptCounter(
            tokenizer, JinjaChatTemplate.from_file(config.chat_template) if config.chat_template else None
        ),
        writer=AnswerWriter(tokenizer, CORPUS),
        faults=faults if faults is not None else Faults(),
        served=[],
        registry=registry,
        metrics=metrics,
        batch=_Batch(config.max_num_seqs, metrics),
    )
    routes = [
        Route("/v1/chat/completions", _GenerationEndpoint(runtime, "chat"), methods=["POST"]),
        Route("/v1/completions", _GenerationEndpoint(runtime, "completions"), methods=["POST"]),
        Route("/v1/models", functools.partial(_list_models, runtime=runtime), methods=["GET"]),
        Route("/health", functools.partial(_health, runtime=runtime), methods=["GET"]),
        Route("/tokenize", functools.partial(_tokenize, runtime=runtime), methods=["POST"]),
        Route("/metrics", functools.partial(_metrics, runtime=runtime), methods=["GET"]),
        Route("/sim/faults", functools.partial(_faults, runtime=runtime), methods=["GET", "PUT"]),
        Route("/sim/served", functools.partial(_served, runtime=runtime), methods=["GET", "DELETE"]),
    ]
    app = _SimApp(routes=routes)
    app.state.config = config
    app.state.faults = runtime.faults
    app.state.served = runtime.served
    app.state.registry = registry
    return app


class _GenerationEndpoint:
    """``POST /v1/chat/completions`` or ``/v1/completions`` as a pure ASGI app, so the stream owns ``send``."""

    def __init__(self, runtime: _Runtime, kind: str) -> None:
        self._runtime = runtime
        self._kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        header_id = request.headers.get("x-request-id")
        tally = Tally(self._runtime.served, request_id=header_id, endpoint=scope["path"])
        exchange = Exchange(scope, send, ClientWatch(receive), tally)
        try:
            await self._handle(request, exchange, header_id or uuid.uuid4().hex)
        except ClientDisconnect:  # gone while sending the body
            tally.commit(client_disconnected=True)
        except RequestError as exc:
            tally.finish_reason = "error"
            tally.prompt_tokens = exc.prompt_tokens if exc.prompt_tokens is not None else tally.prompt_tokens
            await exchange.respond_json(exc.status, exc.body())
        finally:
            await exchange.watch.aclose()
            exchange.commit()  # a no-op unless the request ended early (disconnect, cancellation)

    async def _handle(self, request: Request, exchange: Exchange, base_id: str) -> None:
        body = await _read_json_object(request)
        requested_model = body.get("model")
        exchange.tally.model = requested_model if isinstance(requested_model, str) else None
        exchange.tally.stream = bool(body.get("stream", False))
        exchange.watch.start()
        runtime = self._runtime
        faults = runtime.faults.snapshot()
        if not await exchange.watch.sleep(faults.slow_start_seconds):
            return
        parse = parse_chat if self._kind == "chat" else parse_completion
        job = parse(body, runtime.config, runtime.counter)
        exchange.tally.model = exchange.tally.model or job.model
        exchange.tally.prompt_tokens = job.prompt_tokens
        rng = random.Random(f"{runtime.config.seed}:{base_id}")
        if rng.random() < faults.error_rate:
            raise RequestError(500, "The simulated engine failed (injected fault).", "InternalServerError")
        delivery = self._delivery(job, rng, base_id, faults)
        if not await runtime.batch.join(exchange.watch.wait_gone):
            return  # the client left while waiting: recorded as an abort
        try:
            with runtime.metrics.generating(job.prompt_tokens) as add_generated:
                if job.stream:
                    await stream_answer(exchange, delivery, add_generated)
                else:
                    await send_whole_answer(exchange, delivery, add_generated)
        finally:
            runtime.batch.leave()

    def _delivery(self, job: Job, rng: random.Random, base_id: str, faults: Faults) -> Delivery:
        answer = self._runtime.writer.write(job.answer, rng)
        created = int(time.time())
        frames: ChatFrames | CompletionFrames
        if job.kind == "chat":
            response_id = f"chatcmpl-{base_id}"
            frames = ChatFrames(response_id, created, job.model, answer)
            body = chat_completion_body(response_id, created, job.model, answer, job.prompt_tokens)
        else:
            response_id = f"cmpl-{base_id}"
            frames = CompletionFrames(response_id, created, job.model, answer)
            body = completion_body(response_id, created, job.model, answer, job.prompt_tokens)
        config = self._runtime.config
        return Delivery(
            answer=answer,
            frames=frames,
            body=body,
            prompt_tokens=job.prompt_tokens,
            include_usage=job.include_usage,
            continuous_usage=job.continuous_usage,
            first_token_seconds=config.time_to_first_token_seconds,
            seconds_per_token=config.seconds_per_token,
            fault=faults.token_fault(),
        )


async def _read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise RequestError(400, f"Invalid JSON body: {exc}", "Bad Request") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object", "Bad Request")
    return body


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _list_models(request: Request, runtime: _Runtime) -> Response:
    config = runtime.config
    created = int(time.time())
    base = config.served_model_names[0]
    cards = [_model_card(name, base, None, config.max_model_len, created) for name in config.served_model_names]
    cards += [_model_card(name, f"/sim/lora/{name}", base, None, created) for name in config.lora_adapters]
    return JSONResponse({"object": "list", "data": cards})


def _model_card(
    model_id: str, root: str, parent: str | None, max_model_len: int | None, created: int
) -> dict[str, Any]:
    permission = {
        "id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, model_id).hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [permission],
    }


async def _health(request: Request, runtime: _Runtime) -> Response:
    return Response(status_code=503 if runtime.faults.unhealthy else 200)


async def _tokenize(request: Request, runtime: _Runtime) -> Response:
    """vLLM's ``/tokenize``: the exact ids the worker would see for ``messages`` or ``prompt``."""
    try:
        body = await _read_json_object(request)
        if body.get("model") is not None:
            resolve_model(runtime.config, body["model"])
        tokens = _tokenize_body(body, runtime.tokenizer, runtime.counter)
    except RequestError as exc:
        return _error_response(exc)
    payload = {"count": len(tokens), "max_model_len": runtime.config.max_model_len, "tokens": tokens}
    return JSONResponse({**payload, "token_strs": None})


def _tokenize_body(body: dict[str, Any], tokenizer: Tokenizer, counter: PromptCounter) -> list[int]:
    bos = tokenizer.encode(BEGIN_OF_TEXT)
    if isinstance(body.get("messages"), list):
        try:
            if body.get("add_generation_prompt", True):
                text = counter.render(body["messages"], body.get("tools"))
            else:
                text = render_chat_prompt(body["messages"], body.get("tools"), add_generation_prompt=False)
        except ChatTemplateError as exc:
            raise RequestError(400, str(exc)) from exc
        # Chat defaults to add_special_tokens=false: the template already starts with BOS.
        return (bos if body.get("add_special_tokens", False) else []) + tokenizer.encode(text)
    if isinstance(body.get("prompt"), str):
        return (bos if body.get("add_special_tokens", True) else []) + tokenizer.encode(body["prompt"])
    raise RequestError(400, "send 'messages' (a list) or 'prompt' (a string)", "Bad Request")


async def _metrics(request: Request, runtime: _Runtime) -> Response:
    return Response(generate_latest(runtime.registry), media_type=CONTENT_TYPE_LATEST)


async def _faults(request: Request, runtime: _Runtime) -> Response:
    if request.method == "PUT":
        try:
            runtime.faults.update(await _read_json_object(request))
        except RequestError as exc:
            return _error_response(exc)
        except ValueError as exc:
            return _error_response(RequestError(400, str(exc), "Bad Request"))
        logger.info("simulated worker faults set to %s", runtime.faults.as_dict())
    return JSONResponse(runtime.faults.as_dict())


async def _served(request: Request, runtime: _Runtime) -> Response:
    if request.method == "DELETE":
        runtime.served.clear()
        return Response(status_code=204)
    return JSONResponse(runtime.served)
