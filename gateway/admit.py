"""Step 3, admit: does the request fit the model? ``max_tokens`` against its ceiling, and prompt + ``max_tokens``
against the context window, counted exactly as the worker will count the prompt. Then does it fit the budgets?
Its most possible cost against the tenant's and the key's monthly caps (billing/budgets.py).

The exact count costs a tokenization (about 0.5 ms for 2,000 tokens); a cheap upper bound (one token per byte of
the rendered prompt) proves most requests fit without it. Only when the bound does not, the prompt is counted, and
a large one off the event loop. The count is kept for the bill, which needs it anyway.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Final, Literal

import anyio.to_thread
from redis.exceptions import RedisError

from billing import (
    ApiKey,
    BudgetCheck,
    Budgets,
    ChatTemplateError,
    PromptCounter,
    cost_nano_usd,
    format_usd,
    price_of,
    raw_upper_bound,
)
from config import ModelSettings
from gateway.errors import BudgetExceededError, ContextLengthError, InvalidRequestError, KeyStoreUnavailableError
from gateway.translate import is_bos_prefixed, upstream_messages, upstream_tools
from gateway.validate import InferenceJob

logger = logging.getLogger(__name__)

OFF_LOOP_BYTES: Final = 32_768  # prompts larger than this are tokenized in a worker thread


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """An admitted job (``max_tokens`` possibly clamped, if config says so) and its exact prompt count, if the
    admission needed it; ``prompt_bound`` is never below the exact count."""

    job: InferenceJob
    prompt_tokens: int | None
    prompt_bound: int


async def admit(job: InferenceJob, model: ModelSettings, counter: PromptCounter) -> Admission:
    """Admit ``job`` or raise: 400 / 5006 for ``max_tokens`` over the ceiling, 413 / 5021 over the window."""
    job = _check_ceiling(job, model)
    window = model.context_window_tokens
    bound = _upper_bound(job, counter)
    if bound + job.max_tokens <= window:
        return Admission(job, None, bound)
    prompt_tokens = await count_prompt_async(job, counter, size_bytes=bound)
    if prompt_tokens + job.max_tokens > window:
        if model.over_limit == "clamp" and prompt_tokens < window:
            return Admission(dataclasses.replace(job, max_tokens=window - prompt_tokens), prompt_tokens, prompt_tokens)
        raise ContextLengthError(prompt_tokens + job.max_tokens, window)
    return Admission(job, prompt_tokens, prompt_tokens)


async def admit_spend(
    admission: Admission,
    key: ApiKey,
    model: ModelSettings,
    counter: PromptCounter,
    budgets: Budgets,
    *,
    clock: Callable[[], float],
    on_redis_error: Literal["refuse", "allow"],
) -> tuple[Admission, float]:
    """Check ``admission`` against the monthly budgets in one Redis round trip; the admission (with its exact
    prompt count if the check needed it) and its start time by Redis's clock, which dates its bill.

    Raises 429 / 3036 when a budget would be passed, and 503 / 5530 when Redis cannot be reached (unless
    ``on_redis_error`` is ``"allow"``: then the request goes on unchecked, dated by this replica's clock)."""
    try:
        check = await budgets.check(key, clock())
    except RedisError as exc:
        if on_redis_error == "allow":
            logger.warning("budgets unchecked, Redis unreachable: %r", exc)
            return admission, clock()
        logger.error("cannot check budgets, Redis unreachable: %r", exc)
        raise KeyStoreUnavailableError() from exc
    job = admission.job
    price = price_of(model)
    if admission.prompt_tokens is None and check.exceeded_by(
        cost_nano_usd(price, admission.prompt_bound, job.max_tokens)
    ):
        exact = await count_prompt_async(job, counter, size_bytes=admission.prompt_bound)
        admission = dataclasses.replace(admission, prompt_tokens=exact, prompt_bound=exact)
    max_cost = cost_nano_usd(price, admission.prompt_bound, job.max_tokens)
    if check.exceeded_by(max_cost):
        raise BudgetExceededError(_budget_message(check, max_cost))
    return admission, check.now


def _budget_message(check: BudgetCheck, max_cost: int) -> str:
    which = check.exceeded_by(max_cost)
    cap, spent = (check.key_cap, check.key_spent) if which == "key" else (check.tenant_cap, check.tenant_spent)
    owner = "this key's" if which == "key" else "the account's"
    resets = dt.datetime.fromtimestamp(check.resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"Account limited: {owner} monthly budget of ${format_usd(cap or 0)} would be passed "
        f"(${format_usd(spent)} spent this month; this request may cost up to ${format_usd(max_cost)}). "
        f"The budget resets at {resets}."
    )


async def count_prompt_async(job: InferenceJob, counter: PromptCounter, *, size_bytes: int) -> int:
    """:func:`count_prompt`, in a worker thread when the prompt is large (``size_bytes`` of text or more)."""
    if size_bytes > OFF_LOOP_BYTES:
        return await anyio.to_thread.run_sync(count_prompt, job, counter)
    return count_prompt(job, counter)


def count_prompt(job: InferenceJob, counter: PromptCounter) -> int:
    """The job's prompt tokens, exactly as the worker will report them."""
    if job.raw:
        return counter.count_raw(job.prompt or "", add_special_tokens=not is_bos_prefixed(job))
    try:
        return counter.count_chat(upstream_messages(job), upstream_tools(job) or None)
    except ChatTemplateError as exc:
        raise InvalidRequestError(str(exc)) from exc


def _check_ceiling(job: InferenceJob, model: ModelSettings) -> InferenceJob:
    limit = model.max_tokens_limit
    if job.max_tokens <= limit:
        return job
    if model.over_limit == "clamp":
        return dataclasses.replace(job, max_tokens=limit)
    raise InvalidRequestError(f"'/max_tokens' must be at most {limit} for this model, got {job.max_tokens}")


def _upper_bound(job: InferenceJob, counter: PromptCounter) -> int:
    if job.raw:
        return raw_upper_bound(job.prompt or "")
    try:
        return counter.chat_upper_bound(upstream_messages(job), upstream_tools(job) or None)
    except ChatTemplateError as exc:
        raise InvalidRequestError(str(exc)) from exc
