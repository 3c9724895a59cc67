"""The simulated worker's settings (fixed at creation) and fault knobs (changeable at runtime)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

FaultKind = Literal["die", "in_band_error", "stall"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated vLLM worker behaves.

    Parameters:
        served_model_names: the names accepted as ``model``; the first one is reported in responses and metrics.
        max_model_len: the context window, as ``vllm serve --max-model-len``.
        tokens_per_second: decode speed; 0 or negative sends every token as fast as possible.
        time_to_first_token_seconds: the wait before the first generated token.
        completion_tokens: ``None`` lets each answer stop by itself after a pseudo-random length in
            ``[1, max_tokens]`` derived from the request id; ``N`` stops after ``N`` generated tokens (the stop
            token included), or at ``max_tokens`` with ``finish_reason: "length"`` when that is smaller.
        seed: mixed with the request id into every random choice, so equal requests get equal answers.
        lora_adapters: adapter names, listed in ``/v1/models`` with the first served name as parent.
        chat_template: a Jinja chat-template file (``vllm serve --chat-template``); empty: the built-in Llama 3.1
            template.
        max_num_seqs: the batch capacity, as ``vllm serve --max-num-seqs``: at most this many generation requests
            run at once, and the others wait in arrival order (before their time to first token) for one to end;
            0: no limit.
    """

    served_model_names: tuple[str, ...] = ("meta-llama/Llama-3.1-8B-Instruct",)
    max_model_len: int = 32768
    tokens_per_second: float = 50.0
    time_to_first_token_seconds: float = 0.05
    completion_tokens: int | None = None
    seed: int = 0
    lora_adapters: tuple[str, ...] = ()
    chat_template: str = ""
    max_num_seqs: int = 0

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be at least 1")
        if self.completion_tokens is not None and self.completion_tokens < 1:
            raise ValueError("completion_tokens must be at least 1")
        if self.time_to_first_token_seconds < 0:
            raise ValueError("time_to_first_token_seconds must not be negative")
        if self.max_num_seqs < 0:
            raise ValueError("max_num_seqs must not be negative (0: no limit)")

    @property
    def seconds_per_token(self) -> float:
        return 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0


@dataclass(slots=True)
class Faults:
    """Failures to inject, read once at the start of each request (``GET``/``PUT /sim/faults``).

    Parameters:
        error_rate: the fraction of requests answered with a vLLM-shaped 500 before anything is streamed.
        die_after_tokens: after this many generated tokens were sent, drop the TCP connection (streaming: no
            final chunk, no ``[DONE]``; non-streaming: no response at all).
        stall_after_tokens: after this many tokens, send nothing more but keep the connection open until the
            client goes away.
        slow_start_seconds: extra delay before the response headers.
        in_band_error_after_tokens: after this many tokens, send vLLM's in-band error frame and ``[DONE]``
            (non-streaming: a 500 error body).
        unhealthy: ``/health`` answers 503.

    A token fault fires only if the answer has more tokens than its threshold; when several are set, the lowest
    threshold wins.
    """

    error_rate: float = 0.0
    die_after_tokens: int | None = None
    stall_after_tokens: int | None = None
    slow_start_seconds: float = 0.0
    in_band_error_after_tokens: int | None = None
    unhealthy: bool = False

    def __post_init__(self) -> None:
        self.update(dataclasses.asdict(self))

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set any subset of the fields; raises `ValueError` (changing nothing) on an unknown field or bad value."""
        checked = {name: _check_fault_value(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def snapshot(self) -> Faults:
        return dataclasses.replace(self)

    def token_fault(self) -> tuple[FaultKind, int] | None:
        """The token-count fault with the lowest threshold, if any (ties: die, then in-band error, then stall)."""
        thresholds: tuple[tuple[FaultKind, int | None], ...] = (
            ("die", self.die_after_tokens),
            ("in_band_error", self.in_band_error_after_tokens),
            ("stall", self.stall_after_tokens),
        )
        set_faults = [(after, rank, kind) for rank, (kind, after) in enumerate(thresholds) if after is not None]
        if not set_faults:
            return None
        after, _, kind = min(set_faults)
        return kind, after


_TOKEN_FIELDS = frozenset({"die_after_tokens", "stall_after_tokens", "in_band_error_after_tokens"})


def _check_fault_value(name: str, value: Any) -> Any:
    if name in _TOKEN_FIELDS:
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"{name} must be null or an integer >= 0")
    if name == "error_rate":
        if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return float(value)
        raise ValueError("error_rate must be a number in [0, 1]")
    if name == "slow_start_seconds":
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        raise ValueError("slow_start_seconds must be a number >= 0")
    if name == "unhealthy":
        if isinstance(value, bool):
            return value
        raise ValueError("unhealthy must be a boolean")
    raise ValueError(f"unknown fault {name!r}")
