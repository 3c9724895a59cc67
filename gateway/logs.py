"""Logging: one configuration for every process (``logging.level``, ``logging.format``), and the access log line.

``json`` writes one object per line (``time``, ``level``, ``logger``, ``message``, plus a record's fields), for a
log collector; ``text`` writes plain lines for a terminal. The access log (logger ``tollgate.access``, one line per
request when ``logging.access_log`` is on) carries the request id, tenant, key id, model, status, tokens, cost and
durations. Neither it nor anything else logs the Authorization header or request bodies.
"""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any, Final

from pythonjsonlogger.core import RESERVED_ATTRS

from config import LoggingSettings
from gateway.observe import RequestFacts

ACCESS_LOGGER: Final = "tollgate.access"
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def logging_config(settings: LoggingSettings) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for the settings; uvicorn applies it in each of its processes."""
    if settings.format == "json":
        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "{levelname}{name}{process}{message}",
            "style": "{",
            "timestamp": "time",
            "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],  # uvicorn's copy of the message with ANSI colours
        }
    else:
        formatter = {"format": _TEXT_FORMAT}
    level = settings.level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stdout"}
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's own loggers write through the root handler; its access log is replaced by tollgate.access.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "httpx": {"level": "WARNING"},  # one line per worker call is noise, not a log
            ACCESS_LOGGER: {"level": "INFO" if settings.access_log else "CRITICAL"},
        },
    }


def configure_logging(settings: LoggingSettings) -> None:
    logging.config.dictConfig(logging_config(settings))


def log_access(facts: RequestFacts, method: str, path: str, status: int, client: str, finished: float) -> None:
    """One access log line for a finished request (``finished``: perf_counter() after its last byte)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    duration_ms = _ms(finished - facts.started)
    first_token_ms = None if facts.first_token is None else _ms(facts.first_token - facts.started)
    worker_ms = facts.worker_first_token_seconds
    fields = {
        "request_id": facts.request_id,
        "method": method,
        "path": path,
        "route": facts.route,
        "status": status,
        "outcome": facts.outcome or None,
        "error_code": facts.error_code,
        "tenant": facts.tenant or None,
        "key_id": facts.key_id or None,
        "model": facts.model or None,
        "stream": facts.stream,
        "prompt_tokens": facts.prompt_tokens,
        "completion_tokens": facts.completion_tokens,
        "cost_nano_usd": facts.cost_nano_usd,
        "duration_ms": duration_ms,
        "time_to_first_token_ms": first_token_ms,
        "worker_time_to_first_token_ms": None if worker_ms is None else _ms(worker_ms),
        "worker": facts.worker or None,
        "client": client,
    }
    summary = f"{method} {_printable(path)} {status} {duration_ms} ms id={facts.request_id}"
    if facts.error_code is not None:
        summary += f" code={facts.error_code}"
    if facts.tenant:
        summary += f" tenant={facts.tenant}"
    if facts.model:
        summary += f" model={facts.model}"
    if facts.prompt_tokens is not None:
        summary += f" tokens={facts.prompt_tokens}+{facts.completion_tokens} cost_nano_usd={facts.cost_nano_usd}"
    if facts.outcome:
        summary += f" outcome={facts.outcome}"
    logger.info(summary, extra=fields)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a path like ``/x%0Afake`` must not forge a line in a text log."""
    return _CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
