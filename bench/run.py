"""Measure, in one run, a simulated vLLM worker called directly and the same call through Tollgate.

Usage::

    .venv/bin/python -m bench.run [--concurrency 1,16,64] [--duration 10] [--warmup 2] [--route native|openai]
                                  [--output FILE]

stdout gets one JSON line per (concurrency, target) and one summary line per concurrency; progress, CPU use and
error details go to stderr. See ``bench/README.md`` for what each field means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, TextIO

from bench._load import Phase, Target, is_openai_content, is_workers_ai_content, run_closed_loop
from bench._stack import SERVED_MODEL_NAME, WORKERS_AI_MODEL, Stack, WorkerOptions, running_stack, say
from billing import PromptCounter, Tokenizer

COMPLETION_TOKENS: Final = 64
PROMPT: Final = "Write a short paragraph about toll roads."
FILLER: Final = "Toll roads pay for themselves one vehicle at a time, and every gate keeps a careful ledger. "
TARGETS: Final = ("direct", "tollgate")
# The targets: at concurrency 1 the gateway adds at most 2 ms to TTFT p50; at 16 it keeps 40 % of the rps.
TTFT_P50_BUDGET_MS: Final = 2.0
RPS_RATIO_FLOOR: Final = 0.4


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill also stops the children
    worker = WorkerOptions(args.tokens_per_second, args.ttft_seconds, COMPLETION_TOKENS)
    log_path = args.log or os.path.join(tempfile.gettempdir(), f"tollgate-bench-{os.getpid()}.log")
    say(f"children's output goes to {log_path}")
    try:
        with (
            open(log_path, "ab") as log,
            running_stack(worker, log) as stack,
            _output_file(args.output) as output,
            _event_loop() as runner,
        ):
            runner.run(_bench(stack, args, output))
    except KeyboardInterrupt:
        say("interrupted; everything stopped")
        return 130
    except Exception as exc:
        say(f"failed: {exc!r} (children's output: {log_path})")
        raise
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=_concurrency_list, default=(1, 16, 64), help="default: 1,16,64")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default: 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (default: 2)")
    parser.add_argument("--tokens-per-second", type=float, default=1000.0, help="worker decode speed (default: 1000)")
    parser.add_argument("--ttft-seconds", type=float, default=0.02, help="worker time to first token (default: 0.02)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="make the prompt this many tokens long, chat template included (default: a short ~20-token prompt)",
    )
    parser.add_argument(
        "--route",
        choices=("native", "openai"),
        default="native",
        help="Tollgate's route: native Workers AI (/ai/run) or OpenAI chat (/ai/v1/chat/completions); default: native",
    )
    parser.add_argument("--output", help="also append the JSON lines to this file")
    parser.add_argument("--log", help="file for the children's output (default: a file in the temp directory)")
    return parser


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("every concurrency must be at least 1")
    return values


async def _bench(stack: Stack, args: argparse.Namespace, output: TextIO | None) -> None:
    prompt = build_prompt(args.prompt_tokens)
    if args.prompt_tokens:
        say(f"prompt: {args.prompt_tokens} tokens ({len(prompt)} characters)")
    targets = _targets(stack, prompt, args.route)
    cpu = _CpuWatch({"gateway": stack.gateway_pid, "worker": stack.worker_pid})
    for concurrency in args.concurrency:
        lines: dict[str, dict[str, Any]] = {}
        for name in TARGETS:  # interleaved, so both targets see the same machine state
            say(f"{name}: concurrency {concurrency}, {args.warmup:g} s warmup + {args.duration:g} s")
            phase = await run_closed_loop(
                targets[name],
                concurrency,
                warmup_seconds=args.warmup,
                duration_seconds=args.duration,
                expected_tokens=COMPLETION_TOKENS,
                on_window=cpu.mark,
            )
            lines[name] = _phase_line(phase)
            _emit(lines[name], output)
            _report_phase(phase, cpu.percent())
        summary = _summary_line(concurrency, lines["direct"], lines["tollgate"])
        _emit(summary, output)
        _report_targets(summary)


def build_prompt(prompt_tokens: int) -> str:
    """The bench prompt: the short default, or filler text cut so the rendered prompt has ``prompt_tokens`` tokens."""
    if prompt_tokens <= 0:
        return PROMPT
    counter = PromptCounter(Tokenizer.default())
    overhead = counter.count_chat([{"role": "user", "content": ""}])
    filler = Tokenizer.default().encode(FILLER * (prompt_tokens // 10 + 1))
    text = Tokenizer.default().decode(filler[: max(1, prompt_tokens - overhead)])
    while counter.count_chat([{"role": "user", "content": text}]) > prompt_tokens:
        text = text[:-1]
    return text


def _targets(stack: Stack, prompt: str, route: str) -> dict[str, Target]:
    messages = [{"role": "user", "content": prompt}]
    direct_body = {
        "model": SERVED_MODEL_NAME,
        "messages": messages,
        "stream": True,
        "max_tokens": COMPLETION_TOKENS,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    json_headers = {"content-type": "application/json", "accept": "text/event-stream"}
    account = f"{stack.gateway_url}/client/v4/accounts/{stack.tenant}/ai"
    if route == "openai":  # the same stream as the direct call, ending with its usage chunk
        tollgate_body: dict[str, Any] = {
            "model": WORKERS_AI_MODEL,
            "messages": messages,
            "stream": True,
            "max_tokens": COMPLETION_TOKENS,
            "stream_options": {"include_usage": True},
        }
        tollgate_url, is_content = f"{account}/v1/chat/completions", is_openai_content
    else:
        tollgate_body = {"messages": messages, "stream": True, "max_tokens": COMPLETION_TOKENS}
        tollgate_url, is_content = f"{account}/run/{WORKERS_AI_MODEL}", is_workers_ai_content
    return {
        "direct": Target(
            "direct", stack.worker_url + "/v1/chat/completions", json_headers, _encode(direct_body), is_openai_content
        ),
        "tollgate": Target(
            "tollgate",
            tollgate_url,
            {**json_headers, "authorization": f"Bearer {stack.secret_key}"},
            _encode(tollgate_body),
            is_content,
        ),
    }


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# -- results ----------------------------------------------------------------------------------------------------


def _phase_line(phase: Phase) -> dict[str, Any]:
    ok = [outcome for outcome in phase.outcomes if outcome.error is None]
    ttfts = sorted((o.first_token or o.finished) - o.started for o in ok)
    latencies = sorted(o.finished - o.started for o in ok)
    return {
        "target": phase.target,
        "concurrency": phase.concurrency,
        "requests": len(ok),
        "errors": len(phase.outcomes) - len(ok),
        "duration_seconds": round(phase.duration_seconds, 3),
        "requests_per_second": round(len(ok) / phase.duration_seconds, 2),
        "ttft_p50_ms": _ms(_percentile(ttfts, 0.50)),
        "ttft_p99_ms": _ms(_percentile(ttfts, 0.99)),
        "latency_p50_ms": _ms(_percentile(latencies, 0.50)),
        "tokens_per_second": round(sum(o.completion_tokens for o in ok) / phase.duration_seconds, 1),
    }


def _summary_line(concurrency: int, direct: Mapping[str, Any], tollgate: Mapping[str, Any]) -> dict[str, Any]:
    direct_rps, tollgate_rps = direct["requests_per_second"], tollgate["requests_per_second"]
    return {
        "summary": True,
        "concurrency": concurrency,
        "rps_ratio": round(tollgate_rps / direct_rps, 3) if direct_rps else None,
        "ttft_p50_added_ms": _difference(tollgate["ttft_p50_ms"], direct["ttft_p50_ms"]),
        "ttft_p99_added_ms": _difference(tollgate["ttft_p99_ms"], direct["ttft_p99_ms"]),
    }


def _percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks (NumPy's default method)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _emit(line: Mapping[str, Any], output: TextIO | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if output is not None:
        print(text, file=output, flush=True)


# -- diagnostics (stderr) ---------------------------------------------------------------------------------------


class _CpuWatch:
    """CPU use of the children and of this process over the measured window, from ``/proc`` (Linux only)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._start: tuple[float, dict[str, float | None]] = (0.0, {})
        self._end: tuple[float, dict[str, float | None]] = (0.0, {})

    def mark(self, which: str) -> None:
        sample = (time.perf_counter(), self._sample())
        if which == "start":
            self._start = sample
        else:
            self._end = sample

    def percent(self) -> dict[str, float | None]:
        wall = self._end[0] - self._start[0]
        result: dict[str, float | None] = {}
        for name, before in self._start[1].items():
            after = self._end[1].get(name)
            if wall > 0 and before is not None and after is not None:
                result[name] = round(100 * (after - before) / wall, 1)
            else:
                result[name] = None
        return result

    def _sample(self) -> dict[str, float | None]:
        times = os.times()
        sample: dict[str, float | None] = {"bench": times.user + times.system}
        for name, pid in self._pids.items():
            sample[name] = _process_cpu_seconds(pid)
        return sample


def _process_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report_phase(phase: Phase, cpu: Mapping[str, float | None]) -> None:
    errors: dict[str, int] = {}
    for outcome in phase.outcomes:
        if outcome.error is not None:
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
    usage = ", ".join(f"{name} {value:g}%" if value is not None else f"{name} n/a" for name, value in cpu.items())
    say(f"{phase.target} c={phase.concurrency}: cpu {usage}" + (f"; errors {errors}" if errors else ""))


def _report_targets(summary: Mapping[str, Any]) -> None:
    concurrency = summary["concurrency"]
    if concurrency == 1 and summary["ttft_p50_added_ms"] is not None:
        added = summary["ttft_p50_added_ms"]
        verdict = "met" if added <= TTFT_P50_BUDGET_MS else "missed"
        say(f"target c=1 TTFT p50 added {added} ms (budget {TTFT_P50_BUDGET_MS:g} ms): {verdict}")
    if concurrency == 16 and summary["rps_ratio"] is not None:
        ratio = summary["rps_ratio"]
        verdict = "met" if ratio >= RPS_RATIO_FLOOR else "missed"
        say(f"target c=16 rps ratio {ratio} (floor {RPS_RATIO_FLOOR:g}): {verdict}")


# -- plumbing ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _event_loop() -> Iterator[asyncio.Runner]:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        yield runner


@contextlib.contextmanager
def _output_file(path: str | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
        return
    with open(path, "a", encoding="utf-8") as output:
        yield output


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
