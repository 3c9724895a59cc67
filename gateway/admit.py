"""Step 3, admit: does the request fit the model? ``max_tokens`` against its ceiling, and prompt + ``max_tokens``
against the context window, counted exactly as the worker will count the prompt.

The exact count costs a tokenization (about 0.5 ms for 2,000 tokens); a cheap upper bound (one token per byte of
the rendered prompt) proves most requests fit without it. Only when the bound does not, the prompt is counted, and
a large one off the event loop. The count is kept for the bill, which needs it anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Final

import anyio.to_thread

from billing import ChatTemplateError, PromptCounter, raw_upper_bound
from config import ModelSettings
from gateway.errors import ContextLengthError, InvalidRequestError
from gateway.translate import is_bos_prefixed, upstream_messages, upstream_tools
from gateway.validate import InferenceJob

OFF_LOOP_BYTES: Final = 32_768  # prompts larger than this are tokenized in a worker thread


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """An admitted job (``max_tokens`` possibly clamped, if config says so) and its exact prompt count, if the
    admission needed it."""

    job: InferenceJob
    prompt_tokens: int | None


async def admit(job: InferenceJob, model: ModelSettings, counter: PromptCounter) -> Admission:
    """Admit ``job`` or raise: 400 / 5006 for ``max_tokens`` over the ceiling, 413 / 5021 over the window."""
    job = _check_ceiling(job, model)
    window = model.context_window_tokens
    bound = _upper_bound(job, counter)
    if bound + job.max_tokens <= window:
        return Admission(job, None)
    prompt_tokens = await count_prompt_async(job, counter, size_bytes=bound)
    if prompt_tokens + job.max_tokens > window:
        if model.over_limit == "clamp" and prompt_tokens < window:
            return Admission(dataclasses.replace(job, max_tokens=window - prompt_tokens), prompt_tokens)
        raise ContextLengthError(prompt_tokens + job.max_tokens, window)
    return Admission(job, prompt_tokens)


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
