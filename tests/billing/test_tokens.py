"""Prompt-token counting against the golden file and the worked examples of shared/spec/prompt-tokens.md."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import pytest

from billing.tokens import (
    ChatTemplateError,
    Tokenizer,
    count_chat_prompt_tokens,
    count_raw_prompt_tokens,
    render_chat_prompt,
)
from tests.conftest import OPENAI_WEATHER_TOOL as WEATHER_TOOL

GOLDEN_COPY = Path(__file__).resolve().parents[1] / "data" / "prompt-tokens.jsonl"
# CI clones the repo with shared/ beside it; the repo copy above is what the tests read.
GOLDEN_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "prompt-tokens.jsonl"

HEADER = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def load_golden() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN_COPY.read_text(encoding="utf-8").splitlines() if line.strip()]


def golden_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    if record["kind"] == "prompt":
        return [{"role": "user", "content": record["prompt"]}]
    return record["messages"]


def weather_round_trip(arguments: Any) -> list[dict[str, Any]]:
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call-1", "content": "18C sunny"},
    ]


def test_golden_repo_copy_matches_shared_file():
    if not GOLDEN_SHARED.exists():
        pytest.skip(f"{GOLDEN_SHARED} is not beside the repo")
    assert GOLDEN_COPY.read_bytes() == GOLDEN_SHARED.read_bytes()


def test_count_chat_prompt_tokens_golden_records_match_exactly(tokenizer):
    records = load_golden()
    assert len(records) == 200
    assert {kind: sum(r["kind"] == kind for r in records) for kind in ("chat", "prompt", "tools")} == {
        "chat": 127,
        "prompt": 38,
        "tools": 35,
    }
    counted = [count_chat_prompt_tokens(tokenizer, golden_messages(r), r.get("tools")) for r in records]
    mismatches = [(index, r["prompt_tokens"], n) for index, (r, n) in enumerate(zip(records, counted, strict=True))]
    assert [m for m in mismatches if m[1] != m[2]] == []


def test_count_chat_prompt_tokens_closed_form_equals_rendered_count_for_golden_records(tokenizer):
    plain = [record for record in load_golden() if "tools" not in record]
    assert len(plain) == 165
    for record in plain:
        messages = golden_messages(record)
        rendered = tokenizer.count(render_chat_prompt(messages))
        assert count_chat_prompt_tokens(tokenizer, messages) == rendered == record["prompt_tokens"]


def test_tokenizer_encode_test_vector(tokenizer):
    ids = tokenizer.encode("This is a test sentence.")
    assert [128000, *ids, 128001] == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tokenizer.decode(ids) == "This is a test sentence."
    assert tokenizer.n_vocab == 128256


def test_tokenizer_encode_special_token_text_becomes_special_token(tokenizer):
    assert tokenizer.encode("a<|eot_id|>b") == [64, 128009, 65]
    assert tokenizer.encode("<|reserved_special_token_245|>") == [128255]
    assert tokenizer.encode("<|image|><|python_tag|>") == [128011, 128010]


def test_tokenizer_decode_bytes_keeps_partial_utf8(tokenizer):
    ids = tokenizer.encode("🦉")
    assert len(ids) > 1
    assert tokenizer.decode_bytes(ids[:1]) == "🦉".encode()[: len(tokenizer.decode_bytes(ids[:1]))]
    assert tokenizer.decode(ids[:1]).endswith("\ufffd")
    assert tokenizer.decode(ids) == "🦉"


def test_tokenizer_from_file_equals_default(tokenizer, tmp_path):
    data = importlib.resources.files("llama_models").joinpath("llama3", "tokenizer.model").read_bytes()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    assert Tokenizer.from_file(path).encode("Hello, wörld! <|eot_id|>") == tokenizer.encode("Hello, wörld! <|eot_id|>")


@pytest.mark.parametrize("content", [b"not-base64!! 0\n", b"SGVsbG8=\n", b"\n\n"])
def test_tokenizer_from_file_malformed_raises_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.model"):
        Tokenizer.from_file(path)


def test_example_a_lone_user_message_is_36_tokens(tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    rendered = render_chat_prompt(messages)
    assert rendered == (
        HEADER
        + DATE_LINES
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        + GENERATION_PROMPT
    )
    expected_ids = [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724]
    expected_ids += [2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271, 9906, 128009]
    expected_ids += [128006, 78191, 128007, 271]
    assert tokenizer.encode(rendered) == expected_ids
    assert count_chat_prompt_tokens(tokenizer, messages) == 36


def test_example_b_system_prompt_is_42_tokens(tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}]
    assert tokenizer.encode("You are a helpful assistant.") == [2675, 527, 264, 11190, 18328, 13]
    assert count_chat_prompt_tokens(tokenizer, messages) == 42
    assert tokenizer.count(render_chat_prompt(messages)) == 42


def test_example_c_one_tool_is_173_tokens(tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    rendered = render_chat_prompt(messages, [WEATHER_TOOL])
    tool_json = (
        '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n'
        '        "description": "Get weather for a city",\n        "parameters": {\n            "type": "object",\n'
        '            "properties": {\n                "city": {\n                    "type": "string",\n'
        '                    "description": "City name"\n                }\n            }\n        }\n    }\n}'
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n" + DATE_LINES
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with "
        "a JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" + tool_json + "\n\nWeather in Paris?<|eot_id|>" + GENERATION_PROMPT
    )  # fmt: skip
    assert count_chat_prompt_tokens(tokenizer, messages, [WEATHER_TOOL]) == 173


@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}], ids=["json-string", "dict"])
def test_example_d_tool_round_trip_is_205_tokens(tokenizer, arguments):
    messages = weather_round_trip(arguments)
    rendered = render_chat_prompt(messages, [WEATHER_TOOL])
    assert rendered.endswith(
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"18C sunny"<|eot_id|>' + GENERATION_PROMPT
    )
    assert count_chat_prompt_tokens(tokenizer, messages, [WEATHER_TOOL]) == 205


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": ""}], 35),
        ([{"role": "system", "content": " \n\t\u3000\u00a0"}, {"role": "user", "content": "Hello"}], 36),
        ([{"role": "user", "content": "a<|eot_id|>b"}], 38),
    ],
    ids=["empty-user", "whitespace-system", "special-token-text"],
)
def test_example_e_edge_cases(tokenizer, messages, expected):
    assert count_chat_prompt_tokens(tokenizer, messages) == expected
    assert tokenizer.count(render_chat_prompt(messages)) == expected


def test_count_raw_prompt_tokens_adds_bos_unless_prompt_has_it(tokenizer):
    assert count_raw_prompt_tokens(tokenizer, "Hello") == 2
    assert count_raw_prompt_tokens(tokenizer, "<|begin_of_text|>Hello") == 2
    assert count_raw_prompt_tokens(tokenizer, "<|begin_of_text|>Hello", add_special_tokens=True) == 3
    assert count_raw_prompt_tokens(tokenizer, "Hello", add_special_tokens=False) == 1
    assert count_raw_prompt_tokens(tokenizer, "") == 1


def test_render_chat_prompt_tools_without_messages_raises_template_error():
    with pytest.raises(ChatTemplateError, match="no first user message"):
        render_chat_prompt([], [WEATHER_TOOL])
    with pytest.raises(ChatTemplateError, match="no first user message"):
        render_chat_prompt([{"role": "system", "content": "Be brief."}], [WEATHER_TOOL])


def test_render_chat_prompt_two_tool_calls_raises_template_error(tokenizer):
    messages = weather_round_trip({"city": "Paris"})
    messages[1]["tool_calls"] = messages[1]["tool_calls"] * 2
    with pytest.raises(ChatTemplateError, match=r"^This model only supports single tool-calls at once!$"):
        count_chat_prompt_tokens(tokenizer, messages, [WEATHER_TOOL])


def test_render_chat_prompt_invalid_arguments_json_raises_template_error():
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        render_chat_prompt(weather_round_trip("{city: Paris"), [WEATHER_TOOL])


def test_render_chat_prompt_first_message_consumed_whatever_its_role():
    messages = [{"role": "assistant", "content": "  Hi there  "}, {"role": "user", "content": "Go"}]
    rendered = render_chat_prompt(messages, [WEATHER_TOOL])
    assert "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions" in rendered
    assert "}\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGo<|eot_id|>" in rendered
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n  Hi" not in rendered


def test_count_chat_prompt_tokens_empty_tool_calls_list_is_dropped(tokenizer):
    plain: list[dict[str, Any]] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    with_empty: list[dict[str, Any]] = [plain[0], {**plain[1], "tool_calls": []}]
    with_null: list[dict[str, Any]] = [plain[0], {**plain[1], "tool_calls": None}]
    assert render_chat_prompt(with_empty) == render_chat_prompt(with_null) == render_chat_prompt(plain)
    assert count_chat_prompt_tokens(tokenizer, with_empty) == count_chat_prompt_tokens(tokenizer, plain)


def test_render_chat_prompt_tool_result_is_json_quoted_untrimmed():
    messages = [{"role": "user", "content": "Q"}, {"role": "ipython", "content": ' Zürich "22°C" \\ '}]
    rendered = render_chat_prompt(messages)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n" Zürich \\"22°C\\" \\\\ "<|eot_id|>' in rendered


def test_count_chat_prompt_tokens_list_of_parts_joined_with_newline(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "Hello\nworld"}]
    assert render_chat_prompt(parts) == render_chat_prompt(joined)
    assert count_chat_prompt_tokens(tokenizer, parts) == count_chat_prompt_tokens(tokenizer, joined)


def test_render_chat_prompt_tool_missing_fields_render_as_null():
    tool = {"type": "function", "function": {"parameters": {"type": "object"}, "name": "ping"}}
    rendered = render_chat_prompt([{"role": "user", "content": "x"}], [tool])
    assert '"name": "ping",\n        "description": null,\n        "parameters": {' in rendered


def test_render_chat_prompt_empty_tools_list_renders_like_the_template():
    rendered = render_chat_prompt([{"role": "user", "content": "x"}], [])
    assert "Environment: ipython\n" in rendered
    assert "Do not use variables.\n\nx<|eot_id|>" in rendered


def test_render_chat_prompt_without_generation_prompt():
    rendered = render_chat_prompt([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert rendered.endswith("x<|eot_id|>")


@pytest.mark.parametrize(
    "messages",
    [["not a message"], [{"content": "no role"}], [{"role": "user", "content": 5}]],
    ids=["not-a-mapping", "no-role", "number-content"],
)
def test_count_chat_prompt_tokens_malformed_message_raises_template_error(tokenizer, messages):
    with pytest.raises(ChatTemplateError):
        count_chat_prompt_tokens(tokenizer, messages)
