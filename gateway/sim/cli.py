"""``tollgate worker-sim``: serve a simulated vLLM worker with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from gateway.sim._config import Faults, SimConfig
from gateway.sim.app import create_sim_app

# A stalled stream keeps its connection open until the client leaves; don't let it hold up Ctrl-C for long.
_GRACEFUL_SHUTDOWN_SECONDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker-sim options to ``parser`` (defaults as `SimConfig` and `Faults`)."""
    defaults = SimConfig()
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port (default: 8001)")
    parser.add_argument(
        "--served-model-name",
        action="append",
        dest="served_model_names",
        metavar="NAME",
        help=f"a name accepted as 'model'; repeatable (default: {defaults.served_model_names[0]})",
    )
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len, help="context window")
    parser.add_argument(
        "--tokens-per-second", type=float, default=defaults.tokens_per_second, help="decode speed; 0: no pacing"
    )
    parser.add_argument(
        "--ttft-seconds", type=float, default=defaults.time_to_first_token_seconds, help="time to first token"
    )
    parser.add_argument(
        "--completion-tokens", type=int, default=None, help="answer length in tokens (default: random per request)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed mixed with each request id")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=defaults.max_num_seqs,
        metavar="N",
        help="requests generating at once; the others wait in line (default: 0, no limit)",
    )
    parser.add_argument("--lora", action="append", default=[], metavar="NAME", help="a LoRA adapter name; repeatable")
    parser.add_argument(
        "--chat-template", default="", metavar="FILE", help="a Jinja chat template (default: the built-in Llama 3.1)"
    )
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with a 500")
    parser.add_argument("--die-after-tokens", type=int, default=None, help="drop the connection after N tokens")
    parser.add_argument("--stall-after-tokens", type=int, default=None, help="stop sending after N tokens")


def build_config(args: argparse.Namespace) -> tuple[SimConfig, Faults]:
    """The `SimConfig` and initial `Faults` that the parsed options describe."""
    config = SimConfig(
        served_model_names=tuple(args.served_model_names or SimConfig().served_model_names),
        max_model_len=args.max_model_len,
        tokens_per_second=args.tokens_per_second,
        time_to_first_token_seconds=args.ttft_seconds,
        completion_tokens=args.completion_tokens,
        seed=args.seed,
        lora_adapters=tuple(args.lora),
        chat_template=args.chat_template,
        max_num_seqs=args.max_num_seqs,
    )
    faults = Faults(
        error_rate=args.error_rate,
        die_after_tokens=args.die_after_tokens,
        stall_after_tokens=args.stall_after_tokens,
    )
    return config, faults


def run(args: argparse.Namespace) -> int:
    """Serve the simulated worker until interrupted (uvicorn with uvloop and httptools)."""
    config, faults = build_config(args)
    app = create_sim_app(config, faults=faults)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0
