"""Tokenizer throughput: how many prompt tokens per second one core counts, as admission and billing count them.

    .venv/bin/python -m bench.tokenizer

Prints one JSON line per case: plain text through the tokenizer, and whole chat prompts through the built-in
Llama 3.1 template (closed form) and through the Jinja template file (render + tokenize).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from billing import JinjaChatTemplate, PromptCounter, Tokenizer
from config import CONFIG_DIR

TEXT = (
    "Toll roads pay for themselves one vehicle at a time; every gate keeps a ledger of 1,234 entries, "
    "naïve café owners in Zürich and 東京 included, with code like `f(x) = x * 2` and emoji 🙂. "
)


def measure(name: str, tokens: int, call: Callable[[], object], minimum_seconds: float = 1.0) -> dict[str, object]:
    call()  # warm up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < minimum_seconds:
        call()
        runs += 1
    return {"case": name, "tokens": tokens, "runs": runs, "tokens_per_second": round(tokens * runs / elapsed)}


def main() -> None:
    tokenizer = Tokenizer.default()
    builtin = PromptCounter(tokenizer)
    jinja = PromptCounter(tokenizer, JinjaChatTemplate.from_file(CONFIG_DIR / "templates" / "llama-3.1.jinja"))
    for repeat in (1, 40, 300):
        text = TEXT * repeat
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        count = builtin.count_chat(messages)
        for line in (
            measure("tokenizer", tokenizer.count(text), lambda text=text: tokenizer.count(text)),
            measure("chat-builtin", count, lambda messages=messages: builtin.count_chat(messages)),
            measure("chat-jinja", count, lambda messages=messages: jinja.count_chat(messages)),
        ):
            print(json.dumps(line))


if __name__ == "__main__":
    main()
