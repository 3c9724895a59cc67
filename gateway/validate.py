"""Step 2, validate: a request body → an :class:`InferenceJob`, or a 400 that names the offending field.

Bodies are checked against the model's published Workers AI input schema (config/schemas/), compiled once with
``fastjsonschema`` (about 8 µs for a short chat body; the reference ``jsonschema`` took 180 µs, a tenth of the
time-to-first-token budget), then against the rules the schema leaves to the gateway
(../shared/spec/workers-ai-api.md §3): ``max_tokens`` ≥ 1, whole numbers where the schema says integer, no
``functions``, no ``raw`` in the messages form, no JSON mode with streaming, known roles, finite numbers, and (by
default) no special-token text in chat content. Defaults (``max_tokens``, ``temperature``) are applied here, once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import fastjsonschema

from billing import ChatTemplateError
from billing.tokens import prepare_for_template
from gateway.errors import InvalidRequestError, MissingBodyError

DEFAULT_TEMPERATURE: Final = 0.6
MAX_MESSAGES: Final = 2048
MAX_TOOLS: Final = 128
ROLES: Final = frozenset({"system", "user", "assistant", "tool"})


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceJob:
    """A validated request, with defaults applied. Built only by :func:`validate`."""

    model: str
    form: Literal["prompt", "messages"]
    stream: bool
    max_tokens: int
    temperature: float
    raw: bool = False
    prompt: str | None = None  # the prompt form's text
    messages: tuple[Mapping[str, Any], ...] = ()  # the messages form (the prompt form keeps this empty)
    tools: tuple[Mapping[str, Any], ...] = ()  # as the client sent them (flat or OpenAI shape)
    response_format: Mapping[str, Any] | None = None
    lora: str | None = None
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # top_p, top_k, seed, penalties
    reject_if_busy: bool = False
    stop: tuple[str, ...] = ()  # OpenAI routes: strings that end the answer (not part of it)
    tool_choice: str | Mapping[str, Any] | None = None  # OpenAI routes: "none", "auto", "required" or a named tool

    @property
    def is_json_mode(self) -> bool:
        return self.response_format is not None


_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_SAMPLING_FIELDS: Final = ("top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INTEGER_FIELDS: Final = ("max_tokens", "top_k", "seed")


class JsonSchema:
    """One compiled JSON Schema whose failures are 400s naming the offending field.

    Where a value matches none of several shapes (``oneOf``/``anyOf``), the message is that of the closest shape: the
    one whose failure lies deepest inside the value, preferring a shape of the value's own type. So a tool whose
    parameter lacks a ``description`` is told so, rather than that it matches no definition."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._validate: Callable[[Any], Any] = fastjsonschema.compile(dict(schema))
        self._shapes: dict[str, Callable[[Any], Any]] = {}  # the alternatives of a oneOf/anyOf, compiled when needed

    @classmethod
    def from_file(cls, path: Path) -> JsonSchema:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def check(self, body: Any) -> None:
        try:
            self._validate(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise InvalidRequestError(self._describe(exc)) from None

    def _describe(self, exc: fastjsonschema.JsonSchemaValueException, depth: int = 0) -> str:
        if exc.rule not in ("oneOf", "anyOf") or depth > 8:
            return _describe(exc)
        shapes = exc.definition[exc.rule]
        tagged = _tagged_shapes(shapes, exc.value)
        if tagged == []:  # an object whose "type" tag no shape has
            tags = [tag for shape in shapes for tag in _tags(shape) or ()]
            name = exc.name + ".type"
            message = f"{name} must be one of " + ", ".join(json.dumps(tag) for tag in tags)
            return _describe(fastjsonschema.JsonSchemaValueException(message, name=name))
        failures = []
        for shape in tagged or shapes:
            try:
                self._compiled(shape)(exc.value)
            except fastjsonschema.JsonSchemaValueException as failure:
                failures.append(failure)
        if not failures:  # oneOf matched twice
            return _describe(exc)
        closest = max(failures, key=_closeness)
        if all(failure.rule == "type" and failure.name == "data" for failure in failures):  # none of the types
            kinds = [failure.definition["type"] for failure in failures]
            flat = [kind for entry in kinds for kind in ([entry] if isinstance(entry, str) else entry)]
            expected = " or ".join(dict.fromkeys(flat))
            return _describe(fastjsonschema.JsonSchemaValueException(f"{exc.name} must be {expected}", name=exc.name))
        # The failure is relative to the value: put it back under the value's own place in the body.
        name = exc.name + closest.name[len("data") :]
        detail = closest.message[len(closest.name) :] if closest.message.startswith(closest.name) else closest.message
        located = fastjsonschema.JsonSchemaValueException(
            name + detail, closest.value, name, closest.definition, closest.rule
        )
        return self._describe(located, depth + 1)

    def _compiled(self, shape: Mapping[str, Any]) -> Callable[[Any], Any]:
        key = json.dumps(shape, sort_keys=True, default=str)
        if key not in self._shapes:
            self._shapes[key] = fastjsonschema.compile(dict(shape))
        return self._shapes[key]


class InputSchema:
    """The compiled input schema of one model: one validator per input form."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        forms = {form.get("title", "").lower(): form for form in schema["oneOf"]}
        self._forms = {name: JsonSchema({**form, "type": "object"}) for name, form in forms.items()}

    @classmethod
    def from_file(cls, path: Path) -> InputSchema:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def check(self, body: Mapping[str, Any], form: str) -> None:
        self._forms[form].check(body)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object body. Non-finite numbers, huge integers and deep nesting are a 400, never a 500."""
    if not raw.strip():
        raise MissingBodyError()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int too long, NaN, nesting
        raise InvalidRequestError(f"the body is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # "\\ud800" decodes to a lone surrogate: no text, and not encodable
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequestError("the body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None
    return body


def validate(
    body: Mapping[str, Any],
    model: str,
    schema: InputSchema,
    default_max_tokens: int,
    *,
    forbidden_text: re.Pattern[str] | None = None,
) -> InferenceJob:
    """Check ``body`` against ``schema`` and the gateway's own rules; return the job with defaults applied.

    ``forbidden_text`` (see :func:`special_token_pattern`) is refused in chat content and tools; raw prompts are
    exempt, since their author writes the control tokens on purpose.
    """
    form = _form_of(body)
    schema.check(body, form)
    _check_numbers(body)
    _check_gateway_rules(body, form)
    if forbidden_text is not None:
        _check_forbidden_text(body, form, forbidden_text)
    options = body.get("options")
    return InferenceJob(
        model=model,
        form=form,
        stream=bool(body.get("stream", False)),
        max_tokens=body.get("max_tokens", default_max_tokens),
        temperature=body.get("temperature", DEFAULT_TEMPERATURE),
        raw=bool(body.get("raw", False)),
        prompt=body.get("prompt"),
        messages=tuple(body.get("messages", ())),
        tools=tuple(body.get("tools", ())),
        response_format=body.get("response_format"),
        lora=body.get("lora"),
        sampling={name: body[name] for name in _SAMPLING_FIELDS if name in body},
        reject_if_busy=bool(isinstance(options, dict) and options.get("rejectIfBusy") is True),
    )


def _form_of(body: Mapping[str, Any]) -> Literal["prompt", "messages"]:
    if "prompt" in body and "messages" in body:
        raise InvalidRequestError("'prompt' and 'messages' are mutually exclusive at '/'")
    if "messages" in body:
        return "messages"
    if "prompt" in body:
        return "prompt"
    raise InvalidRequestError("required properties at '/' are 'prompt' or 'messages'")


def _check_numbers(body: Mapping[str, Any]) -> None:
    if "max_tokens" in body and body["max_tokens"] < 1:
        raise InvalidRequestError(f"'/max_tokens' must be at least 1, got {body['max_tokens']}")
    check_number_kinds(body, whole=_INTEGER_FIELDS, finite=("temperature", *_SAMPLING_FIELDS))


def check_number_kinds(body: Mapping[str, Any], *, whole: tuple[str, ...], finite: tuple[str, ...]) -> None:
    """What a schema's number checks miss: JSON Schema counts ``3.0`` as an integer (a worker would not), and
    ``1e999`` parses as infinity, which passes no range check. ``null`` values are left to the schema."""
    for name in whole:
        value = body.get(name)
        if value is not None and not isinstance(value, int):
            raise InvalidRequestError(f"'/{name}' must be a whole number, got {value!r}")
    for name in finite:
        value = body.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"'/{name}' must be a finite number")


def _check_gateway_rules(body: Mapping[str, Any], form: str) -> None:
    if "functions" in body:
        raise InvalidRequestError("'/functions' is not supported; describe tools with '/tools'")
    if form == "messages" and body.get("raw"):
        raise InvalidRequestError("'/raw' is only allowed with 'prompt', not with 'messages'")
    if body.get("response_format") is not None and body.get("stream"):
        raise InvalidRequestError("'/response_format' (JSON mode) does not support streaming ('/stream': true)")
    _check_response_format(body.get("response_format"))
    if "options" in body and not isinstance(body["options"], dict):
        raise InvalidRequestError("'/options' must be an object")
    messages = body.get("messages", [])
    if form == "messages" and not messages:
        raise InvalidRequestError("'/messages' must contain at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"'/messages' has more than {MAX_MESSAGES} items")
    for index, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise InvalidRequestError(f"'/messages/{index}/role' must be one of {', '.join(sorted(ROLES))}")
    if len(body.get("tools", ())) > MAX_TOOLS:
        raise InvalidRequestError(f"'/tools' has more than {MAX_TOOLS} items")


def special_token_pattern(special_tokens: frozenset[str]) -> re.Pattern[str]:
    """A pattern that finds any of the tokenizer's special tokens written as text."""
    return re.compile("|".join(re.escape(token) for token in sorted(special_tokens, key=len, reverse=True)))


def _check_forbidden_text(body: Mapping[str, Any], form: str, pattern: re.Pattern[str]) -> None:
    if form == "prompt":
        if not body.get("raw") and pattern.search(body["prompt"]):
            raise InvalidRequestError(special_token_message("/prompt"))
        return
    check_chat_text(body["messages"], body.get("tools") or (), pattern)


def check_chat_text(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any], pattern: re.Pattern[str]) -> None:
    """Refuse special-token text anywhere the chat template renders: in each message as the worker prepares it
    (tool-call arguments parsed from their JSON string, where an escaped ``\\u003c|eot_id|>`` becomes the real
    text), and in the tools."""
    try:
        prepared, _ = prepare_for_template(messages, None)
    except ChatTemplateError as exc:
        raise InvalidRequestError(str(exc)) from exc
    for index, message in enumerate(prepared):
        for key, value in message.items():
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if pattern.search(text):
                raise InvalidRequestError(special_token_message(f"/messages/{index}/{key}"))
    if tools and pattern.search(json.dumps(list(tools), ensure_ascii=False)):
        raise InvalidRequestError(special_token_message("/tools"))


def special_token_message(pointer: str) -> str:
    return f"'{pointer}' contains special-token text such as '<|eot_id|>', which is not allowed in chat content"


def _check_response_format(response_format: Any) -> None:
    if response_format is None:
        return
    kind = response_format.get("type")
    if kind is None:
        raise InvalidRequestError("required property '/response_format/type' is missing")
    if kind == "json_schema" and not isinstance(response_format.get("json_schema"), dict):
        raise InvalidRequestError("'/response_format/json_schema' must be an object (the JSON Schema)")


def _tags(shape: Mapping[str, Any]) -> list[Any] | None:
    """The values a shape allows for an object's ``type`` tag (``{"type": "json_schema", ...}``), if it names them."""
    tag = (shape.get("properties") or {}).get("type") or {}
    if "const" in tag:
        return [tag["const"]]
    return list(tag["enum"]) if "enum" in tag else None


def _tagged_shapes(shapes: list[Mapping[str, Any]], value: Any) -> list[Mapping[str, Any]] | None:
    """The shapes an object's ``type`` tag selects; ``None`` where tags do not decide (no tag, or untagged shapes)."""
    if not isinstance(value, dict) or "type" not in value:
        return None
    tags = [_tags(shape) for shape in shapes if shape.get("type") in ("object", None)]
    if not tags or any(allowed is None for allowed in tags):
        return None
    return [shape for shape in shapes if value["type"] in (_tags(shape) or ())]


def _closeness(failure: fastjsonschema.JsonSchemaValueException) -> tuple[int, bool]:
    """How close a shape came to a value: the depth of its failure, then whether the value had the shape's type (an
    object or array refused by a list of allowed scalars had not)."""
    refused_scalar = failure.rule in ("enum", "const") and isinstance(failure.value, dict | list)
    wrong_type = failure.rule == "type" or refused_scalar
    return failure.name.count(".") + failure.name.count("["), not wrong_type


def _describe(exc: fastjsonschema.JsonSchemaValueException) -> str:
    """``data.messages[0].content must be string`` → ``'/messages/0/content': must be string``."""
    path = exc.name[len("data") :] if exc.name.startswith("data") else exc.name
    pointer = "/" + "/".join(part for part in re.split(r"[.\[\]]+", path) if part)
    detail = exc.message[len(exc.name) :].strip() if exc.message.startswith(exc.name) else exc.message
    if exc.rule == "enum":  # fastjsonschema writes Python's False/None
        detail = "must be one of " + ", ".join(json.dumps(value) for value in exc.definition["enum"])
    elif exc.rule == "const":
        detail = "must be " + json.dumps(exc.definition["const"])
    return f"'{pointer}': {_first_line(detail)}"


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")
