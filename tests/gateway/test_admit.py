"""Admission: the context window and max_tokens, with prompts counted exactly as the worker counts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from billing import PromptCounter, Tokenizer
from gateway.admit import admit
from gateway.translate import upstream_messages, upstream_tools
from gateway.validate import InferenceJob
from tests.conftest import (
    FP8_MODEL,
    MODEL,
    REPO,
    TENANT,
    WEATHER_TOOL as TOOL,
    Gateway,
    SimWorker,
    gateway_for,
    make_settings,
    sim_worker,
)
from tests.promtext import samples, total

LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 400  # ~5,600 tokens
BODIES = {
    "prompt": {"prompt": LONG_TEXT},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG_TEXT}]},
    "tools": {"messages": [{"role": "user", "content": LONG_TEXT}], "tools": [TOOL]},
    "raw": {"prompt": LONG_TEXT, "raw": True},
}


def exact_prompt_tokens(counter: PromptCounter, body: dict[str, Any]) -> int:
    if body.get("raw"):
        return counter.count_raw(body["prompt"])
    job = InferenceJob(
        model=MODEL,
        form="messages" if "messages" in body else "prompt",
        stream=False,
        max_tokens=1,
        temperature=0.6,
        prompt=body.get("prompt"),
        messages=tuple(body.get("messages", ())),
        tools=tuple(body.get("tools", ())),
    )
    return counter.count_chat(upstream_messages(job), upstream_tools(job) or None)


@pytest.mark.parametrize("form", list(BODIES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_admit_prompt_plus_max_tokens_may_equal_the_window_but_not_exceed_it(
    gateway: Gateway, worker: SimWorker, form: str, stream: bool
) -> None:
    body = {**BODIES[form], "stream": stream}
    prompt_tokens = exact_prompt_tokens(gateway.deps.counters[MODEL], body)
    assert 5000 < prompt_tokens < 7968

    fits = await gateway.run({**body, "max_tokens": 7968 - prompt_tokens})
    assert fits.status_code == 200, fits.text
    assert worker.record_for(fits.headers["x-request-id"])["prompt_tokens"] == prompt_tokens

    over = await gateway.run({**body, "max_tokens": 7968 - prompt_tokens + 1})
    assert over.status_code == 413
    assert over.json()["errors"] == [
        {
            "code": 5021,
            "message": "The estimated number of input and maximum output tokens (7969) exceeded this model "
            "context window limit (7968).",
        }
    ]
    assert len(worker.served) == 1  # the refused request reached no worker
    events = await gateway.deps.ledger.events(TENANT)
    assert [event["request_id"] for event in events] == [fits.headers["x-request-id"]]


async def test_admit_fp8_window_is_32000(gateway: Gateway, worker: SimWorker) -> None:
    body = {"prompt": LONG_TEXT}
    prompt_tokens = exact_prompt_tokens(gateway.deps.counters[FP8_MODEL], body)
    assert (await gateway.run({**body, "max_tokens": 32000 - prompt_tokens}, model=FP8_MODEL)).status_code == 200
    over = await gateway.run({**body, "max_tokens": 32001 - prompt_tokens}, model=FP8_MODEL)
    assert over.status_code == 413 and "(32001)" in over.json()["errors"][0]["message"]


async def test_admit_max_tokens_alone_over_the_window_is_refused(gateway: Gateway) -> None:
    response = await gateway.run({"prompt": "hi", "max_tokens": 10**20})
    assert response.status_code == 400
    assert "'/max_tokens' must be at most 7968" in response.json()["errors"][0]["message"]


def edited_config(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    text = (REPO / "config" / "tollgate.yaml").read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)  # the first model block is the 8b model's
    path = tmp_path / "tollgate.yaml"
    path.write_text(text)
    return path


async def test_admit_over_limit_can_clamp_when_config_says_so(
    tmp_path: Path, tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    config = edited_config(
        tmp_path,
        ("max_tokens_ceiling: 0 ", "max_tokens_ceiling: 100 "),
        ("default_max_tokens: 256", "default_max_tokens: 64"),
        ("over_limit: refuse ", "over_limit: clamp "),
    )
    async with (
        sim_worker(tokenizer, tokens_per_second=0, time_to_first_token_seconds=0, completion_tokens=10_000) as sim,
        gateway_for(redis_url, tokenizer, [sim.url], config=config) as gateway,
    ):
        ceiling = await gateway.run({"prompt": "hi", "max_tokens": 5000})
        assert ceiling.status_code == 200
        assert ceiling.json()["result"]["usage"]["completion_tokens"] == 100  # the worker was sent max_tokens 100

    config = edited_config(tmp_path, ("over_limit: refuse ", "over_limit: clamp "))
    async with (
        sim_worker(tokenizer, tokens_per_second=0, time_to_first_token_seconds=0, completion_tokens=10_000) as sim,
        gateway_for(redis_url, tokenizer, [sim.url], config=config) as gateway,
    ):
        body = {"prompt": LONG_TEXT, "max_tokens": 5000}
        prompt_tokens = exact_prompt_tokens(gateway.deps.counters[MODEL], body)
        window = await gateway.run(body)
        assert window.status_code == 200
        assert window.json()["result"]["usage"]["completion_tokens"] == 7968 - prompt_tokens


async def test_admit_counts_with_the_workers_template_when_configured(
    tmp_path: Path, tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    template = REPO / "tests" / "data" / "templates" / "default-system-prompt.jinja"
    config = edited_config(tmp_path, ('chat_template: ""  ', f'chat_template: "{template}"  '))
    async with (
        sim_worker(tokenizer, tokens_per_second=0, completion_tokens=5, chat_template=str(template)) as sim,
        gateway_for(redis_url, tokenizer, [sim.url], config=config) as gateway,
    ):
        response = await gateway.run({"messages": [{"role": "user", "content": "Hello"}]})
        usage = response.json()["result"]["usage"]
        assert usage["prompt_tokens"] == 36 + 6  # the template's default system prompt, as the worker counted it
        assert sim.record_for(response.headers["x-request-id"])["prompt_tokens"] == 42
        body = {"messages": [{"role": "user", "content": LONG_TEXT}]}
        prompt_tokens = exact_prompt_tokens(PromptCounter(tokenizer), body) + 6
        assert (await gateway.run({**body, "max_tokens": 7968 - prompt_tokens})).status_code == 200
        assert (await gateway.run({**body, "max_tokens": 7969 - prompt_tokens})).status_code == 413
        metrics = (await gateway.client.get("/metrics")).text
        assert total(samples(metrics), "tollgate_token_count_mismatches_total") == 0  # gateway and worker agree


async def test_admit_worker_misreporting_prompt_tokens_is_billed_our_count_and_counted(
    tokenizer: Tokenizer, redis: Redis, redis_url: str
) -> None:
    def lying_worker(request: httpx.Request) -> httpx.Response:
        answer = {
            "choices": [{"message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 999_999, "completion_tokens": 3, "total_tokens": 1_000_002},
        }
        return httpx.Response(200, json=answer)

    http = httpx.AsyncClient(transport=httpx.MockTransport(lying_worker))
    async with gateway_for(redis_url, tokenizer, ["http://worker.test"], http=http) as gateway:
        response = await gateway.run({"prompt": "Hello"})
        assert response.json()["result"]["usage"] == {
            "prompt_tokens": 36,
            "completion_tokens": 3,
            "total_tokens": 39,
            "cost_nano_usd": 36 * 280 + 3 * 830,
            "cost_usd": "0.000012570",
        }
        [event] = await gateway.deps.ledger.events(TENANT)
        assert event["prompt_tokens"] == "36" and event["cost_nano_usd"] == str(36 * 280 + 3 * 830)
        metrics = (await gateway.client.get("/metrics")).text
        assert f'tollgate_token_count_mismatches_total{{kind="prompt",model="{MODEL}"}} 1.0' in metrics


async def test_admit_small_prompts_skip_tokenization_large_ones_are_counted(tokenizer: Tokenizer) -> None:
    settings = make_settings("redis://127.0.0.1:9/0")
    counter = PromptCounter(tokenizer)
    model = settings.models[MODEL]
    small = InferenceJob(model=MODEL, form="prompt", stream=False, max_tokens=256, temperature=0.6, prompt="Hello")
    assert (await admit(small, model, counter)).prompt_tokens is None
    large = InferenceJob(model=MODEL, form="prompt", stream=False, max_tokens=256, temperature=0.6, prompt=LONG_TEXT)
    admission = await admit(large, model, counter)
    assert admission.prompt_tokens == counter.count_chat([{"role": "user", "content": LONG_TEXT}])
