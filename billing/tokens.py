"""Prompt-token counting for Llama 3.1 Instruct, exactly as a vLLM worker counts them.

vLLM renders the model's Hugging Face chat template and tokenizes the whole string with special-token text
allowed (``shared/spec/prompt-tokens.md`` §1-2). This module does the same with Meta's tiktoken BPE file:

```python
tokenizer = Tokenizer.default()  # once, in the factory: loading takes about a second
count_chat_prompt_tokens(tokenizer, [{"role": "user", "content": "Hello"}])  # 36
count_raw_prompt_tokens(tokenizer, "Hello")  # 2: BOS + "Hello"
```

The tokenizer is loaded from a local file only; nothing here touches the network.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import tiktoken

__all__ = [
    "BEGIN_OF_TEXT",
    "ChatTemplateError",
    "Tokenizer",
    "count_chat_prompt_tokens",
    "count_raw_prompt_tokens",
    "render_chat_prompt",
]

BEGIN_OF_TEXT: Final = "<|begin_of_text|>"

# llama_models/llama3/tokenizer.py: the pre-tokenizer split and the 256 special tokens that follow the 128,000
# ranks of the BPE file (prompt-tokens.md §6).
_PAT_STR: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIAL_TOKENS: Final = (
    BEGIN_OF_TEXT,
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
_NUM_SPECIAL_TOKENS: Final = 256
_SPECIAL_TOKENS: Final = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(_NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

# Pieces of the HF Llama 3.1 template (prompt-tokens.md §2). The date is the template's default: vLLM is never sent
# chat_template_kwargs.date_string by tollgate.
_EOT: Final = "<|eot_id|>"
_DATE_LINES: Final = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_TOOLS_PREAMBLE: Final = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
_NO_FIRST_USER_MESSAGE: Final = "Cannot put tools in the first user message when there's no first user message!"
_SINGLE_TOOL_CALL_ONLY: Final = "This model only supports single tool-calls at once!"
_TOOL_RESULT_ROLES: Final = frozenset({"tool", "ipython"})


_SPECIAL_MARK: Final = "<|"  # every Llama 3 special token starts with it
_MAX_FIXED_COUNTS: Final = 64


class ChatTemplateError(ValueError):
    """The chat template refused the conversation, as the HF template's ``raise_exception`` would.

    vLLM answers these with a 400 ``BadRequestError``; the message is the template's own text where it has one.
    """


class Tokenizer:
    """Meta's Llama 3 BPE (128,000 ranks + 256 special tokens) on tiktoken, encoding as vLLM's HF tokenizer does.

    Special-token text such as ``<|eot_id|>`` inside the input becomes the special token. Build one per process
    with `Tokenizer.default()` or `Tokenizer.from_file(path)`; the object is immutable and safe to share between
    tasks and threads.
    """

    __slots__ = ("_encoding", "_fixed_counts")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        self._fixed_counts: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.model`` file: one ``base64(token_bytes) rank`` pair per line."""
        with open(path, "rb") as file:
            data = file.read()
        return cls._from_bpe_bytes(data, source=os.fspath(path))

    @classmethod
    def default(cls) -> Tokenizer:
        """Load ``llama3/tokenizer.model`` from the installed ``llama_models`` package (no network)."""
        resource = importlib.resources.files("llama_models").joinpath("llama3", "tokenizer.model")
        return cls._from_bpe_bytes(resource.read_bytes(), source=str(resource))

    @classmethod
    def _from_bpe_bytes(cls, data: bytes, *, source: str) -> Tokenizer:
        ranks = _parse_bpe_ranks(data, source=source)
        special_tokens = {token: len(ranks) + offset for offset, token in enumerate(_SPECIAL_TOKENS)}
        encoding = tiktoken.Encoding(
            name=f"llama3:{os.path.basename(source)}",
            pat_str=_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special_tokens,
            explicit_n_vocab=len(ranks) + len(special_tokens),
        )
        return cls(encoding)

    @property
    def special_tokens(self) -> frozenset[str]:
        """The special tokens' texts, e.g. ``<|eot_id|>``."""
        return frozenset(self._encoding.special_tokens_set)

    @property
    def n_vocab(self) -> int:
        """Ranks plus special tokens: 128,256 for Llama 3."""
        return self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text becomes special tokens (``allowed_special="all"``)."""
        if _SPECIAL_MARK not in text:
            # Same ids, without handing tiktoken the set of 256 special tokens on every call (~60 µs).
            return self._encoding.encode_ordinary(text)
        return self._encoding.encode(text, allowed_special="all")

    def count(self, text: str) -> int:
        """``len(encode(text))``."""
        return len(self.encode(text))

    def count_fixed(self, text: str) -> int:
        """``count(text)`` for the few strings a chat template repeats (headers, roles), remembered."""
        count = self._fixed_counts.get(text)
        if count is None:
            count = self.count(text)
            if len(self._fixed_counts) < _MAX_FIXED_COUNTS:
                self._fixed_counts[text] = count
        return count

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``, which may end in the middle of a UTF-8 character."""
        return self._encoding.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; incomplete UTF-8 sequences become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _parse_bpe_ranks(data: bytes, *, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"{source}:{number}: expected 'base64(token) rank'") from exc
    if not ranks:
        raise ValueError(f"{source}: no BPE ranks found")
    return ranks


@dataclass(frozen=True, slots=True)
class _Message:
    """A message after vLLM's preprocessing: string content, and the single tool call of an assistant turn."""

    role: str
    content: str
    tool_call: tuple[str, Any] | None = None

    @property
    def is_plain(self) -> bool:
        return self.tool_call is None and self.role not in _TOOL_RESULT_ROLES


def render_chat_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render Meta's HF Llama 3.1 chat template exactly as vLLM does (prompt-tokens.md §2).

    ``tools`` are in OpenAI shape, ``{"type": "function", "function": {"name", "description", "parameters"}}``.
    ``None`` means no tools; an empty list renders as the template renders it (``Environment: ipython`` and the
    first message consumed), as vLLM v0.11 does. List-of-parts contents are joined with ``"\\n"``, assistant
    ``tool_calls`` arguments given as JSON strings are parsed, and empty ``tool_calls`` lists are dropped.

    Raises `ChatTemplateError` where the template raises, and for messages vLLM would reject.
    """
    conversation = [_prepare_message(message) for message in messages]
    return _render(
        conversation,
        None if tools is None else [_normalize_tool(tool) for tool in tools],
        add_generation_prompt=add_generation_prompt,
    )


def prepare_for_template(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools as vLLM hands them to a Jinja chat template: string contents, assistant tool-call
    arguments parsed into objects (empty ``tool_calls`` dropped), tools in ``model_dump()`` shape."""
    prepared = []
    for message in messages:
        item = _prepare_message(message)
        rendered = {key: value for key, value in message.items() if key != "tool_calls"}
        rendered["content"] = item.content
        if item.tool_call is not None:
            name, arguments = item.tool_call
            rendered["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": arguments}}]
        prepared.append(rendered)
    return prepared, None if tools is None else [_normalize_tool(tool) for tool in tools]


def count_chat_prompt_tokens(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """``usage.prompt_tokens`` of a ``/v1/chat/completions`` request, as vLLM reports it.

    Without tools, tool calls or tool results, the closed form of prompt-tokens.md §4 is used (each piece is
    tokenized on its own, which is exact because special tokens and the trimmed contents split the BPE);
    otherwise the rendered template is tokenized. Raises `ChatTemplateError` like `render_chat_prompt`.
    """
    conversation = [_prepare_message(message) for message in messages]
    if tools is None and all(message.is_plain for message in conversation):
        return _count_plain_conversation(tokenizer, conversation)
    rendered = _render(conversation, None if tools is None else [_normalize_tool(tool) for tool in tools])
    return tokenizer.count(rendered)


def count_raw_prompt_tokens(tokenizer: Tokenizer, prompt: str, *, add_special_tokens: bool | None = None) -> int:
    """``usage.prompt_tokens`` of a raw ``/v1/completions`` prompt (prompt-tokens.md §7).

    ``add_special_tokens`` is what the request sends: ``True`` adds BOS, ``False`` does not. ``None`` (the default)
    follows tollgate's rule: BOS is added unless the prompt already starts with the literal ``<|begin_of_text|>``,
    in which case tollgate sends ``add_special_tokens: false``.
    """
    if add_special_tokens is None:
        add_special_tokens = not prompt.startswith(BEGIN_OF_TEXT)
    return tokenizer.count(prompt) + (1 if add_special_tokens else 0)


def _count_plain_conversation(tokenizer: Tokenizer, conversation: Sequence[_Message]) -> int:
    # 30 for Llama 3: BOS, the system header, the 20-token date lines, <|eot_id|> and the generation prompt.
    total = tokenizer.count_fixed(BEGIN_OF_TEXT + _header("system") + _DATE_LINES + _EOT + _header("assistant"))
    if conversation and conversation[0].role == "system":
        total += tokenizer.count(conversation[0].content.strip())
        conversation = conversation[1:]
    frame = tokenizer.count_fixed(_header("") + _EOT)  # 4: both header tokens, "\n\n" and <|eot_id|>
    for message in conversation:
        total += tokenizer.count_fixed(message.role) + frame + tokenizer.count(message.content.strip())
    return total


def _render(
    conversation: Sequence[_Message],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    add_generation_prompt: bool = True,
) -> str:
    system_text = ""
    if conversation and conversation[0].role == "system":
        system_text = conversation[0].content.strip()
        conversation = conversation[1:]
    parts = [BEGIN_OF_TEXT, _system_block(system_text, has_tools=tools is not None)]
    if tools is not None:
        if not conversation:
            raise ChatTemplateError(_NO_FIRST_USER_MESSAGE)
        parts.append(_first_user_block(tools, conversation[0].content.strip()))
        conversation = conversation[1:]
    parts.extend(_render_message(message) for message in conversation)
    if add_generation_prompt:
        parts.append(_header("assistant"))
    return "".join(parts)


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _system_block(system_text: str, *, has_tools: bool) -> str:
    environment = "Environment: ipython\n" if has_tools else ""
    return _header("system") + environment + _DATE_LINES + system_text + _EOT


def _first_user_block(tools: Sequence[Mapping[str, Any]], text: str) -> str:
    rendered_tools = "".join(json.dumps(tool, ensure_ascii=False, indent=4) + "\n\n" for tool in tools)
    return _header("user") + _TOOLS_PREAMBLE + rendered_tools + text + _EOT


def _render_message(message: _Message) -> str:
    if message.tool_call is not None:
        name, arguments = message.tool_call
        call = '{"name": "' + name + '", "parameters": ' + json.dumps(arguments, ensure_ascii=False) + "}"
        return _header("assistant") + call + _EOT
    if message.role in _TOOL_RESULT_ROLES:
        # A string is "iterable" to Jinja, so the template JSON-quotes tool results, untrimmed.
        return _header("ipython") + json.dumps(message.content, ensure_ascii=False) + _EOT
    return _header(message.role) + message.content.strip() + _EOT


def _prepare_message(message: Mapping[str, Any]) -> _Message:
    if not isinstance(message, Mapping):
        raise ChatTemplateError("each message must be an object")
    role = message.get("role")
    if not isinstance(role, str):
        raise ChatTemplateError("each message needs a string 'role'")
    content = _content_text(message.get("content"))
    tool_call = None
    # vLLM keeps tool_calls on assistant messages only, and drops a null list; tollgate also drops an empty one.
    tool_calls = message.get("tool_calls") if role == "assistant" else None
    if tool_calls:
        tool_call = _single_tool_call(tool_calls)
    return _Message(role=role, content=content, tool_call=tool_call)


def _content_text(content: Any) -> str:
    # vLLM joins list-of-parts content with "\n" before rendering; a missing content renders as "".
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ChatTemplateError("only text content parts are supported")
        return "\n".join(texts)
    raise ChatTemplateError("message content must be a string or a list of text parts")


def _single_tool_call(tool_calls: Any) -> tuple[str, Any]:
    if not isinstance(tool_calls, Sequence) or len(tool_calls) != 1:
        raise ChatTemplateError(_SINGLE_TOOL_CALL_ONLY)
    call = tool_calls[0]
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatTemplateError("a tool call needs a function with a string 'name'")
    arguments = function.get("arguments")
    # vLLM's _postprocess_messages: a falsy arguments value becomes {}, a JSON string is parsed.
    if not arguments:
        arguments = {}
    elif not isinstance(arguments, dict | list):
        try:
            arguments = json.loads(arguments)
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
            raise ChatTemplateError(f"tool call arguments are not valid JSON: {exc}") from exc
    return function["name"], arguments


def _normalize_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The tool as vLLM v0.11 passes it to the template: ``model_dump()`` field order, omitted fields as null."""
    if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
        raise ChatTemplateError("each tool must be an object with a 'function' object")
    function = tool["function"]
    if not isinstance(function.get("name"), str):
        raise ChatTemplateError("each tool function needs a string 'name'")
    normalized_function = {
        "name": function["name"],
        "description": function.get("description"),
        "parameters": function.get("parameters"),
    }
    normalized_function.update((key, value) for key, value in function.items() if key not in normalized_function)
    normalized = {"type": tool.get("type", "function"), "function": normalized_function}
    normalized.update((key, value) for key, value in tool.items() if key not in normalized)
    return normalized
