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
from typing import TYPE_CHECKING, Final

import anyio.to_thread
from redis.exceptions import RedisError

from billing import (
    AdmissionDecision,
    ApiKey,
    ChatTemplateError,
    Limits,
    PromptCounter,
    cost_nano_usd,
    format_usd,
    price_of,
    raw_upper_bound,
)
from config import LimitSettings, ModelSettings
from gateway.errors import (
    BudgetExceededError,
    ContextLengthError,
    InvalidRequestError,
    KeyStoreUnavailableError,
    RateLimitedError,
    TollgateError,
)
from gateway.translate import is_bos_prefixed, upstream_messages, upstream_tools
from gateway.validate import InferenceJob

if TYPE_CHECKING:
    from gateway.deps import Dependencies

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


async def admit_request(
    admission: Admission, key: ApiKey, request_id: str, deps: Dependencies
) -> tuple[Admission, float, dict[str, str]]:
    """Check ``admission`` against the monthly budgets and the key's rate limits in one Redis round trip, and take
    its place in the limits. Returns the admission (with its exact prompt count if the check needed it), its start
    time by Redis's clock (which dates its bill), and the rate-limit headers for its response.

    Raises 429 / 3036 when a budget would be passed and 429 / 5429 over a rate limit. When Redis cannot be reached,
    the request goes on unchecked, dated by this replica's clock, unless the configuration says to refuse it then
    (503 / 5530; see :func:`_unchecked`); either way it is counted in ``tollgate_admission_unchecked_total``."""
    job = admission.job
    model = deps.settings.models[job.model]
    counter = deps.counters[job.model]
    limits = effective_limits(key, deps.settings.limits)
    if limits.tokens_per_minute and admission.prompt_tokens is None:  # reserve what the request really needs
        admission = await _counted(admission, counter)
    price = price_of(model)
    default_cap = deps.settings.budgets.default_monthly_nano_usd or None
    while True:
        max_cost = cost_nano_usd(price, admission.prompt_bound, job.max_tokens)
        try:
            decision = await deps.limiter.admit(
                key,
                limits,
                request_id=request_id,
                reserve_tokens=admission.prompt_bound + job.max_tokens,
                max_cost_nano_usd=max_cost,
                now_hint=deps.clock(),
                default_cap_nano_usd=default_cap,
            )
        except RedisError as exc:
            return admission, _unchecked(exc, key, deps), {}
        if decision.verdict.startswith("budget") and admission.prompt_tokens is None:
            admission = await _counted(admission, counter)  # the cheap bound was too high to tell: count, ask again
            continue
        break
    headers = rate_limit_headers(decision)
    if decision.verdict != "ok":
        deps.metrics.record_refusal(job.model, decision.verdict)
    if decision.verdict in ("budget_key", "budget_tenant"):
        error: TollgateError = BudgetExceededError(_budget_message(decision, max_cost))
    elif decision.verdict != "ok":
        error = RateLimitedError(_limit_message(decision, admission.prompt_bound + job.max_tokens), _retry(decision))
    else:
        return admission, decision.now, headers
    error.extra_headers.update(headers)
    raise error


def effective_limits(key: ApiKey, config: LimitSettings) -> Limits:
    """The key's own limits where it has them, else its tenant's from the config, else the default."""
    tenant = config.tenants.get(key.tenant, config.default)
    own = key.limits
    return Limits(
        requests_per_minute=_first(own.requests_per_minute, tenant.requests_per_minute),
        tokens_per_minute=_first(own.tokens_per_minute, tenant.tokens_per_minute),
        concurrent_streams=_first(own.concurrent_streams, tenant.concurrent_streams),
    )


def rate_limit_headers(decision: AdmissionDecision) -> dict[str, str]:
    """``x-ratelimit-*`` for the limits the key has: the limit, what is left of it in the current minute, and the
    time until the oldest request of the window leaves it (freeing a request and its tokens)."""
    limits, headers = decision.limits, {}
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    if rpm:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - decision.requests_in_window))
        headers["x-ratelimit-reset-requests"] = f"{decision.requests_reset_seconds:.3f}s"
    if tpm:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - decision.tokens_in_window))
        refused = decision.verdict == "tokens"
        reset = decision.tokens_reset_seconds if refused else decision.requests_reset_seconds
        headers["x-ratelimit-reset-tokens"] = f"{reset:.3f}s"
    return headers


async def _counted(admission: Admission, counter: PromptCounter) -> Admission:
    exact = await count_prompt_async(admission.job, counter, size_bytes=admission.prompt_bound)
    return dataclasses.replace(admission, prompt_tokens=exact, prompt_bound=exact)


def _unchecked(exc: RedisError, key: ApiKey, deps: Dependencies) -> float:
    """Redis cannot be reached: go on unchecked, or refuse, as configured. Budgets refuse (by default) only where
    one may apply: the key has its own, or its tenant had one when this process last saw it, or has not been seen."""
    seen, tenant_cap = deps.limiter.last_tenant_cap(key.tenant)
    budget_may_apply = key.monthly_budget_nano_usd is not None or tenant_cap is not None or not seen
    refuse = deps.settings.limits.on_redis_error == "refuse" or (
        budget_may_apply and deps.settings.budgets.on_redis_error == "refuse"
    )
    deps.metrics.redis_errors.labels("admission").inc()
    deps.metrics.admission_unchecked.labels("refused" if refuse else "allowed").inc()
    if refuse:
        logger.error("cannot check budgets and limits, Redis unreachable: %r", exc)
        raise KeyStoreUnavailableError() from exc
    logger.warning("budgets and limits unchecked, Redis unreachable: %r", exc)
    return deps.clock()


def _first(own: int | None, inherited: int) -> int:
    return inherited if own is None else own


def _retry(decision: AdmissionDecision) -> float | None:
    return None if decision.verdict == "tokens_too_large" else decision.retry_after_seconds


def _limit_message(decision: AdmissionDecision, reserve: int) -> str:
    limits = decision.limits
    if decision.verdict == "requests":
        return f"Rate limited: this key may make {limits.requests_per_minute} requests per minute"
    if decision.verdict == "streams":
        return f"Rate limited: this key may run {limits.concurrent_streams} requests at once"
    if decision.verdict == "tokens":
        return (
            f"Rate limited: this key may use {limits.tokens_per_minute} tokens per minute; this request reserves "
            f"{reserve} (prompt + max_tokens) and {decision.tokens_in_window} are in use"
        )
    return (
        f"This request reserves {reserve} tokens (prompt + max_tokens), more than this key's limit of "
        f"{limits.tokens_per_minute} tokens per minute: lower max_tokens"
    )


def _budget_message(decision: AdmissionDecision, max_cost: int) -> str:
    if decision.verdict == "budget_key":
        owner, cap, spent = "this key's", decision.key_cap, decision.key_spent
    else:
        owner, cap, spent = "the account's", decision.tenant_cap, decision.tenant_spent
    resets = dt.datetime.fromtimestamp(decision.budget_resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
