"""Counting prompt tokens as the workers will: the chat template they run, then the Llama 3 tokenizer.

The template is configurable per model. The default is the built-in Llama 3.1 format (billing/tokens.py, with the
closed form of prompt-tokens.md §4 where it applies). A Jinja file is rendered the way transformers renders chat
templates for vLLM: an ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, a ``tojson``
that keeps key order and non-ASCII text, ``raise_exception`` and ``strftime_now``, with ``messages``, ``tools``,
``add_generation_prompt=True`` and ``bos_token``. A fleet that runs another template (vLLM's tool template, say)
therefore still gets exact counts, as long as the gateway is given the same file.

Usage::

    counter = PromptCounter(tokenizer)                                  # the built-in Llama 3.1 template
    counter = PromptCounter(tokenizer, JinjaChatTemplate.from_file(p))  # the workers' own template file
    counter.chat_upper_bound(messages, tools)  # cheap: no tokenization
    counter.count_chat(messages, tools)        # exact
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from billing.tokens import (
    BEGIN_OF_TEXT,
    ChatTemplateError,
    Tokenizer,
    count_chat_prompt_tokens,
    count_raw_prompt_tokens,
    prepare_for_template,
    render_chat_prompt,
)

Messages = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]] | None


class ChatTemplate(Protocol):
    """Turns a conversation into the prompt text the worker tokenizes."""

    def render(self, messages: Messages, tools: Tools) -> str: ...


class BuiltinLlama31Template:
    """Meta's Llama 3.1 chat template, built in (prompt-tokens.md §2)."""

    def render(self, messages: Messages, tools: Tools) -> str:
        return render_chat_prompt(messages, tools)


class JinjaChatTemplate:
    """A Jinja chat-template file, rendered as transformers renders it for vLLM."""

    def __init__(self, source: str, *, name: str = "<template>") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"{name}: line {exc.lineno}: {exc.message}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> JinjaChatTemplate:
        return cls(Path(path).read_text(encoding="utf-8"), name=str(path))

    def render(self, messages: Messages, tools: Tools) -> str:
        prepared_messages, prepared_tools = prepare_for_template(messages, tools)
        try:
            return self._template.render(
                messages=prepared_messages, tools=prepared_tools, add_generation_prompt=True, bos_token=BEGIN_OF_TEXT
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc


class PromptCounter:
    """Prompt tokens of chat and raw requests, with one template and one tokenizer. Immutable; share it."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None = None) -> None:
        self.tokenizer = tokenizer
        self._template = template

    def count_chat(self, messages: Messages, tools: Tools = None) -> int:
        """Exactly what the worker reports as ``usage.prompt_tokens``. Raises ``ChatTemplateError``."""
        if self._template is None:
            return count_chat_prompt_tokens(self.tokenizer, messages, tools)
        return self.tokenizer.count(self._template.render(messages, tools))

    def count_raw(self, prompt: str, *, add_special_tokens: bool | None = None) -> int:
        return count_raw_prompt_tokens(self.tokenizer, prompt, add_special_tokens=add_special_tokens)

    def chat_upper_bound(self, messages: Messages, tools: Tools = None) -> int:
        """An upper bound on :meth:`count_chat`, without tokenizing: the UTF-8 length of the rendered prompt.

        Every token, special tokens included, stands for at least one byte of the text it was cut from.
        """
        return len(self.render(messages, tools).encode())

    def render(self, messages: Messages, tools: Tools = None) -> str:
        return (self._template or BuiltinLlama31Template()).render(messages, tools)


def raw_upper_bound(prompt: str) -> int:
    """An upper bound on a raw prompt's tokens: one per byte, plus BOS."""
    return len(prompt.encode()) + 1


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' own tojson: json.dumps keeping key order and non-ASCII text (unlike Jinja's built-in).
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(format_string: str) -> str:
    return dt.datetime.now().strftime(format_string)
