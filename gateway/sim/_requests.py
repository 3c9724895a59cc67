"""Reading ``/v1/chat/completions`` and ``/v1/completions`` bodies, and refusing them as vLLM v0.11 does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from billing.prompts import PromptCounter
from billing.tokens import ChatTemplateError
from gateway.sim._answer import AnswerRequest
from gateway.sim._config import SimConfig
from gateway.sim._frames import error_body

_COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A request vLLM refuses, with the status and error type it answers with."""

    def __init__(self, status: int, message: str, error_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.prompt_tokens: int | None = None  # set when the prompt was counted before the refusal

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.status, self.param)


@dataclass(frozen=True, slots=True)
class Job:
    """A generation request that passed vLLM's checks."""

    kind: Literal["chat", "completions"]
    model: str  # the name reported back: the first served name, or the adapter
    stream: bool
    include_usage: bool
    continuous_usage: bool
    prompt_tokens: int
    answer: AnswerRequest


def resolve_model(config: SimConfig, requested: Any) -> str:
    """The model name to report for ``requested``; raises vLLM's 404 for an unknown name."""
    if requested is None or requested in config.served_model_names:
        return config.served_model_names[0]
    if requested in config.lora_adapters:
        return str(requested)
    raise RequestError(404, f"The model `{requested}` does not exist.", "NotFoundError", "model")


def parse_chat(body: Mapping[str, Any], config: SimConfig, counter: PromptCounter) -> Job:
    """Check a chat request and count its prompt as the worker does."""
    model = resolve_model(config, body.get("model"))
    messages = body.get("messages")
    tools = body.get("tools")
    if not isinstance(messages, list):
        raise RequestError(400, "'messages' must be a list of messages", "Bad Request")
    if tools is not None and not isinstance(tools, list):
        raise RequestError(400, "'tools' must be a list of tools", "Bad Request")
    stream, include_usage, continuous_usage = _stream_options(body)
    try:
        prompt_tokens = counter.count_chat(messages, tools)
    except ChatTemplateError as exc:
        raise RequestError(400, str(exc)) from exc
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    max_tokens = _with_prompt_tokens(_chat_max_tokens, requested, prompt_tokens, config.max_model_len)
    answer = AnswerRequest(
        max_tokens=max_tokens,
        completion_tokens=config.completion_tokens,
        tool=_tool_to_call(body, tools, messages),
        tool_named=isinstance(body.get("tool_choice"), Mapping),
        stop=_stop(body),
        **_json_format(body.get("response_format")),
    )
    return Job("chat", model, stream, include_usage, continuous_usage, prompt_tokens, answer)


def parse_completion(body: Mapping[str, Any], config: SimConfig, counter: PromptCounter) -> Job:
    """Check a raw-prompt request; ``add_special_tokens`` defaults to true, so BOS is counted."""
    model = resolve_model(config, body.get("model"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "the simulated worker accepts one string 'prompt'", "Bad Request")
    stream, include_usage, continuous_usage = _stream_options(body)
    add_special_tokens = bool(body.get("add_special_tokens", True))
    prompt_tokens = counter.count_raw(prompt, add_special_tokens=add_special_tokens)
    requested = body.get("max_tokens", _COMPLETIONS_DEFAULT_MAX_TOKENS)
    max_tokens = _with_prompt_tokens(_completion_max_tokens, requested, prompt_tokens, config.max_model_len)
    answer = AnswerRequest(max_tokens=max_tokens, completion_tokens=config.completion_tokens, stop=_stop(body))
    return Job("completions", model, stream, include_usage, continuous_usage, prompt_tokens, answer)


def _stream_options(body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.", "Bad Request")
    if not isinstance(options, Mapping):
        raise RequestError(400, "'stream_options' must be an object", "Bad Request")
    # v0.11: include_usage defaults to true once stream_options is sent; continuous stats need include_usage.
    include_usage = bool(options.get("include_usage", True))
    return stream, include_usage, include_usage and bool(options.get("continuous_usage_stats", False))


def _with_prompt_tokens(
    check: Callable[[Any, int, int], int], requested: Any, prompt_tokens: int, max_model_len: int
) -> int:
    try:
        return check(requested, prompt_tokens, max_model_len)
    except RequestError as exc:
        exc.prompt_tokens = prompt_tokens
        raise


def _check_max_tokens_type(requested: Any) -> None:
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool)):
        raise RequestError(400, "'max_tokens' must be an integer", "Bad Request")


def _chat_max_tokens(requested: Any, prompt_tokens: int, max_model_len: int) -> int:
    _check_max_tokens_type(requested)
    if prompt_tokens >= max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages. None",
        )
    if requested is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + requested > max_model_len:
        raise RequestError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({requested} > {max_model_len} - {prompt_tokens}). None",
        )
    return _at_least_one(requested)


def _completion_max_tokens(requested: Any, prompt_tokens: int, max_model_len: int) -> int:
    _check_max_tokens_type(requested)
    if requested is None:  # an explicit null fills the context, as in chat
        requested = max_model_len - prompt_tokens
    if prompt_tokens > max_model_len - requested or prompt_tokens >= max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len - requested} tokens. However, your request "
            f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.",
        )
    return _at_least_one(requested)


def _at_least_one(max_tokens: int) -> int:
    if max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.")
    return max_tokens


def _tool_to_call(
    body: Mapping[str, Any], tools: list[Mapping[str, Any]] | None, messages: list[Any]
) -> Mapping[str, Any] | None:
    """The tool to answer with: the first one (or the named ``tool_choice``) when the user spoke last."""
    if not tools or not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "user":
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        for tool in tools:
            if tool["function"].get("name") == choice["function"].get("name"):
                return tool
    return tools[0]


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return tuple(stop)
    if stop is not None:
        raise RequestError(400, "'stop' must be a string or a list of strings", "Bad Request")
    return ()


def _json_format(response_format: Any) -> dict[str, Any]:
    if not isinstance(response_format, Mapping):
        return {}
    if response_format.get("type") == "json_object":
        return {"json_mode": True}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return {"json_mode": True, "json_schema": schema if isinstance(schema, Mapping) else None}
    return {}
