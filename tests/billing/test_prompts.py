"""Prompt counting through a configurable chat template: the Jinja path renders as transformers does, reproduces
the golden counts with the Llama 3.1 file, and follows another template where it differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from billing import ChatTemplateError, JinjaChatTemplate, PromptCounter, Tokenizer, raw_upper_bound
from config import CONFIG_DIR
from tests.conftest import OPENAI_WEATHER_TOOL as TOOL

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = [json.loads(line) for line in (DATA / "prompt-tokens.jsonl").read_text().splitlines()]
EXAMPLE_C = [{"role": "user", "content": "Weather in Paris?"}]
EXAMPLE_D = [
    *EXAMPLE_C,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "content": "18C sunny", "tool_call_id": "c1"},
]


def conversation(record: dict[str, Any]) -> list[dict[str, Any]]:
    return record.get("messages") or [{"role": "user", "content": record["prompt"]}]


@pytest.fixture(scope="module")
def jinja_counter(tokenizer: Tokenizer) -> PromptCounter:
    return PromptCounter(tokenizer, JinjaChatTemplate.from_file(CONFIG_DIR / "templates" / "llama-3.1.jinja"))


@pytest.fixture(scope="module")
def other_counter(tokenizer: Tokenizer) -> PromptCounter:
    return PromptCounter(tokenizer, JinjaChatTemplate.from_file(DATA / "templates" / "default-system-prompt.jinja"))


def test_prompts_jinja_llama31_file_reproduces_all_golden_counts(jinja_counter: PromptCounter) -> None:
    assert len(GOLDEN) == 200
    wrong = [
        (index, record["prompt_tokens"], jinja_counter.count_chat(conversation(record), record.get("tools")))
        for index, record in enumerate(GOLDEN)
        if jinja_counter.count_chat(conversation(record), record.get("tools")) != record["prompt_tokens"]
    ]
    assert wrong == []


def test_prompts_jinja_and_builtin_render_the_same_text(tokenizer: Tokenizer, jinja_counter: PromptCounter) -> None:
    builtin = PromptCounter(tokenizer)
    for messages, tools in [(EXAMPLE_C, [TOOL]), (EXAMPLE_D, [TOOL]), (conversation(GOLDEN[0]), None)]:
        assert jinja_counter.render(messages, tools) == builtin.render(messages, tools)
    assert (jinja_counter.count_chat(EXAMPLE_C, [TOOL]), jinja_counter.count_chat(EXAMPLE_D, [TOOL])) == (173, 205)


def test_prompts_another_template_changes_the_counts_as_it_dictates(
    tokenizer: Tokenizer, other_counter: PromptCounter
) -> None:
    builtin = PromptCounter(tokenizer)
    default_system = tokenizer.count("You are a helpful assistant.")
    assert default_system == 6
    for record in GOLDEN[:40]:
        messages = conversation(record)
        has_system = messages[0]["role"] == "system"
        expected = record["prompt_tokens"] + (0 if has_system else default_system)
        assert other_counter.count_chat(messages, record.get("tools")) == expected
        assert builtin.count_chat(messages, record.get("tools")) == record["prompt_tokens"]


def test_prompts_upper_bound_is_never_below_the_count(tokenizer: Tokenizer, jinja_counter: PromptCounter) -> None:
    builtin = PromptCounter(tokenizer)
    for record in GOLDEN:
        messages, tools = conversation(record), record.get("tools")
        assert builtin.chat_upper_bound(messages, tools) >= record["prompt_tokens"]
        assert jinja_counter.chat_upper_bound(messages, tools) >= record["prompt_tokens"]
    for prompt in ("Hello", "<|begin_of_text|>x", "日本語のテキスト", "🙂" * 10):
        assert raw_upper_bound(prompt) >= builtin.count_raw(prompt)


def test_prompts_template_errors_are_chat_template_errors(jinja_counter: PromptCounter) -> None:
    with pytest.raises(ChatTemplateError, match="no first user message"):
        jinja_counter.count_chat([], [TOOL])
    two_calls = [*EXAMPLE_C, {"role": "assistant", "content": "", "tool_calls": [EXAMPLE_D[1]["tool_calls"][0]] * 2}]
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        jinja_counter.count_chat(two_calls, [TOOL])


def test_prompts_broken_template_file_fails_at_load_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message.content }}")
    with pytest.raises(ValueError, match=r"broken\.jinja"):
        JinjaChatTemplate.from_file(broken)
