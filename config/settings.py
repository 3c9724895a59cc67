"""Tollgate's settings: one frozen tree, built once from a YAML file plus ``TOLLGATE_*`` environment overrides.

Usage::

    settings = load_settings()                                   # config/tollgate.yaml + os.environ
    settings = load_settings("prod.yaml", {"TOLLGATE_REDIS__URL": "redis://redis:6379/0"})

Environment overrides name the key path in upper case with ``__`` between levels
(``TOLLGATE_SERVER__PORT=9000``, ``TOLLGATE_POOLS__BF16__WORKERS=http://a:8000,http://b:8000``). Lists are
comma-separated. A bad or unknown key fails at start-up with a :class:`SettingsError` naming the key path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import yaml

CONFIG_DIR: Final = Path(__file__).parent
DEFAULT_CONFIG_PATH: Final = CONFIG_DIR / "tollgate.yaml"
SCHEMA_DIR: Final = CONFIG_DIR / "schemas"
ENV_PREFIX: Final = "TOLLGATE_"
_frozen = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)


class SettingsError(ValueError):
    """The configuration is invalid; the message names the offending key path."""


@_frozen
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 1_048_576
    drain_seconds: float = 30.0  # on SIGTERM: streams in flight may finish for this long, then are ended and billed


@_frozen
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout_seconds: float = 2.0
    connect_timeout_seconds: float = 2.0
    retries: int = 2
    max_connections: int = 256


@_frozen
class AuthSettings:
    cache_ttl_seconds: float = 1.0
    stale_if_error_seconds: float = 300.0  # Redis unreachable: keys read this recently keep working


@_frozen
class AdminSettings:
    token: str = ""  # bootstrap bearer token for the admin routes; set it from a secret (TOLLGATE_ADMIN__TOKEN)


@_frozen
class BudgetSettings:
    default_monthly_nano_usd: int = 0  # every tenant's monthly cap unless one is set for it; 0: no default cap
    on_redis_error: Literal["refuse", "allow"] = "refuse"  # budgets cannot be checked: refuse (503) or allow


@_frozen
class ValidationSettings:
    # Special-token text (e.g. "<|eot_id|>") in chat content becomes real control tokens on the worker, so a
    # tenant could forge turns (RELIABILITY §7.6b). "reject" refuses such bodies with 400; raw prompts are exempt.
    special_tokens: Literal["reject", "allow"] = "reject"
    large_body_bytes: int = 65_536  # bodies at least this large are parsed and validated off the event loop


@_frozen
class TokenizerSettings:
    path: str = ""


@_frozen
class UpstreamSettings:
    connect_timeout_seconds: float = 2.0
    first_token_timeout_seconds: float = 60.0  # request sent → first token (streams); then another worker is tried
    between_tokens_timeout_seconds: float = 30.0  # a stream silent this long is ended with an error event
    total_timeout_seconds: float = 600.0  # the whole answer, streamed or not
    # When a stream's headers go out: once a worker accepts it, or only with its first token (then every failure
    # before the first token, even after retries, is an HTTP error status rather than an in-band error event).
    stream_headers: Literal["on_accept", "with_first_token"] = "on_accept"
    max_connections: int = 1024
    max_keepalive_connections: int = 256
    max_response_bytes: int = 8_388_608
    hang_up_drain_seconds: float = 2.0  # a client left mid-stream: read what the worker sent until it stopped


@_frozen
class RateLimits:
    requests_per_minute: int = 0  # 0: no limit
    tokens_per_minute: int = 0  # prompt + max_tokens reserved at admission, the real count at the end
    concurrent_streams: int = 0  # requests running at once (streamed or not)


@_frozen
class LimitSettings:
    default: RateLimits = RateLimits()  # every key's limits, unless its tenant or the key itself has others
    tenants: Mapping[str, RateLimits] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    on_redis_error: Literal["allow", "refuse"] = "allow"  # limits cannot be checked: let the request through
    slot_ttl_seconds: float = 600.0  # a concurrency slot whose gateway died (so never released) frees after this


@_frozen
class LedgerSettings:
    seen_ttl_seconds: int = 3_024_000
    events_retention_seconds: int = 3_024_000
    hourly_retention_seconds: int = 34_560_000
    daily_retention_seconds: int = 158_112_000
    spool_dir: str = "var/spool"  # relative paths start from the working directory
    spool_replay_interval_seconds: float = 1.0


@_frozen
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"  # json: one object per line, for log collectors; text: for a terminal
    access_log: bool = True  # one line per request: id, tenant, model, status, tokens, cost, durations


@_frozen
class MetricsSettings:
    # Tenants whose token and cost metrics carry their own ``tenant`` label; every other tenant is "other". Keep the
    # list short: each tenant multiplies those series (keys never appear in metrics).
    tenant_labels: tuple[str, ...] = ()
    sample_interval_seconds: float = 1.0  # how often each process writes its workers' state to the metrics
    token: str = ""  # set: GET /metrics wants "Authorization: Bearer <token>" (from a secret: TOLLGATE_METRICS__TOKEN)


@_frozen
class WorkerSettings:
    """One worker of a pool. In YAML or the environment a bare URL stands for ``{url: <URL>}``."""

    url: str
    weight: float = 1.0  # its share of the traffic relative to the pool's other workers, at equal load
    lora: tuple[str, ...] = ()  # LoRA adapters it serves, besides those its /v1/models lists


@_frozen
class PoolSettings:
    workers: tuple[WorkerSettings, ...]


@_frozen
class RoutingSettings:
    max_in_flight_per_worker: int = 64  # requests this replica has on one worker at once; 0: no cap
    queue_size: int = 1024  # requests of one pool waiting for a free worker, per replica; then 429 / 3040
    queue_timeout_seconds: float = 10.0  # the longest such wait; then 429 / 3040
    retries: int = 2  # other workers tried before the first byte reaches the client
    prefix_affinity: bool = False  # the same system prompt goes to the same worker (its prefix cache) ...
    affinity_max_imbalance: int = 8  # ... unless that worker has this many more requests than the least loaded
    metrics_interval_seconds: float = 2.0  # each worker's /metrics (queue and KV-cache load) is read this often
    health_interval_seconds: float = 5.0  # each worker's /health and /v1/models are checked this often
    health_timeout_seconds: float = 2.0
    eject_after_failures: int = 3  # consecutive failed requests (5xx, timeouts, dropped streams) that eject a worker
    eject_seconds: float = 5.0  # an ejected worker gets its first trial after this; doubled after each failed trial
    max_eject_seconds: float = 60.0
    reload_interval_seconds: float = 5.0  # the config file's pools are re-read this often; 0: never


@_frozen
class ModelSettings:
    pool: str
    served_name: str
    input_schema: str
    context_window_tokens: int
    default_max_tokens: int = 256
    max_tokens_ceiling: int = 0  # 0: the context window is the only limit
    over_limit: Literal["refuse", "clamp"] = "refuse"  # max_tokens over the ceiling or the window
    chat_template: str = ""  # the workers' Jinja chat template; empty: the built-in Llama 3.1 format
    prompt_nano_usd_per_token: int
    completion_nano_usd_per_token: int

    @property
    def input_schema_path(self) -> Path:
        path = Path(self.input_schema)
        return path if path.is_absolute() else SCHEMA_DIR / path

    @property
    def chat_template_path(self) -> Path | None:
        if not self.chat_template:
            return None
        path = Path(self.chat_template)
        return path if path.is_absolute() else CONFIG_DIR / path

    @property
    def max_tokens_limit(self) -> int:
        return min(self.max_tokens_ceiling or self.context_window_tokens, self.context_window_tokens)


@_frozen
class Settings:
    """The whole configuration. Built by :func:`load_settings`; never mutated."""

    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    admin: AdminSettings = AdminSettings()
    budgets: BudgetSettings = BudgetSettings()
    limits: LimitSettings = LimitSettings()
    validation: ValidationSettings = ValidationSettings()
    tokenizer: TokenizerSettings = TokenizerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    routing: RoutingSettings = RoutingSettings()
    ledger: LedgerSettings = LedgerSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    pools: Mapping[str, PoolSettings] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    models: Mapping[str, ModelSettings] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


# Numbers that must be greater than 0; every other number may be 0 (often: "off"), none may be negative.
POSITIVE_SETTINGS: Final = (
    "server.port",
    "server.workers",
    "server.max_body_bytes",
    "server.drain_seconds",
    "redis.max_connections",
    "upstream.first_token_timeout_seconds",
    "upstream.between_tokens_timeout_seconds",
    "upstream.total_timeout_seconds",
    "upstream.max_connections",
    "routing.queue_timeout_seconds",
    "routing.metrics_interval_seconds",
    "routing.health_interval_seconds",
    "routing.health_timeout_seconds",
    "routing.eject_after_failures",
    "routing.eject_seconds",
    "ledger.seen_ttl_seconds",
    "ledger.events_retention_seconds",
    "ledger.spool_replay_interval_seconds",
    "limits.slot_ttl_seconds",
    "metrics.sample_interval_seconds",
)
TOKEN_MIN_CHARS: Final = 32  # admin.token and metrics.token, when set

# Settings written as a bare string stand for a mapping with this one key.
SHORTHAND: Final[Mapping[type, str]] = {WorkerSettings: "url"}


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (default: ``TOLLGATE_CONFIG`` or ``config/tollgate.yaml``), overlay ``TOLLGATE_*`` variables
    from ``environ`` (default: ``os.environ``), and build a validated, frozen :class:`Settings`.
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read config file {config_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{config_path}: the top level must be a mapping")
    _overlay_environment(raw, environ)
    settings = _build(Settings, raw, "")
    _check(settings)
    return settings


def load_pools(
    settings: Settings, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Mapping[str, PoolSettings]:
    """Re-read the configuration and return its pools, checked against ``settings``' models (a pool reload: the
    other sections keep their values until a restart). Raises :class:`SettingsError` like :func:`load_settings`."""
    fresh = load_settings(path, environ)
    _check_pools(fresh.pools, settings.models)
    return fresh.pools


def _overlay_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value  # a string: cast by the field's type in _convert


def _build(cls: type[Any], data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SettingsError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"{_join(path, unknown[0])}: unknown key")
    values = {}
    for field in dataclasses.fields(cls):
        key = _join(path, field.name)
        if field.name in data:
            values[field.name] = _convert(hints[field.name], data[field.name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{key}: missing required key")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if hint in SHORTHAND and isinstance(value, str):
            value = {SHORTHAND[hint]: value}
        return _build(typing.cast(type, hint), value, key)
    if origin is Mapping:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a mapping")
        return types.MappingProxyType({str(k): _convert(item_hint, v, _join(key, str(k))) for k, v in value.items()})
    if origin is tuple:
        items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SettingsError(f"{key}: expected a list")
        item_hint = typing.get_args(hint)[0]
        return tuple(_convert(item_hint, item, f"{key}[{index}]") for index, item in enumerate(items))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise SettingsError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if hint in (int, float):
        return _to_number(hint, value, key)
    if hint is bool:
        return _to_bool(value, key)
    if hint is str:
        if isinstance(value, bool | dict | list) or value is None:
            raise SettingsError(f"{key}: expected a string")
        return str(value)
    raise SettingsError(f"{key}: unsupported setting type {hint!r}")  # pragma: no cover - a programming error


def _to_number(hint: type[int] | type[float], value: Any, key: str) -> int | float:
    if isinstance(value, bool) or (hint is int and isinstance(value, float)):
        raise SettingsError(f"{key}: expected {hint.__name__}, got {value!r}")
    try:
        number = hint(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    if number < 0 or not math.isfinite(number):  # negative, NaN or infinite
        raise SettingsError(f"{key}: must be a finite, non-negative number, got {value!r}")
    return number


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise SettingsError(f"{key}: expected true or false, got {value!r}")


def _check(settings: Settings) -> None:
    for key in POSITIVE_SETTINGS:
        value = functools.reduce(getattr, key.split("."), settings)
        if value <= 0:
            raise SettingsError(f"{key}: must be greater than 0")
    for key, token in (("admin.token", settings.admin.token), ("metrics.token", settings.metrics.token)):
        if token and len(token) < TOKEN_MIN_CHARS:
            raise SettingsError(f"{key}: use at least {TOKEN_MIN_CHARS} random characters (or leave it empty)")
    if settings.server.port > 65535:
        raise SettingsError("server.port: must be at most 65535")
    if not settings.models:
        raise SettingsError("models: at least one model must be configured")
    if settings.routing.max_eject_seconds < settings.routing.eject_seconds:
        raise SettingsError("routing.max_eject_seconds: must be at least routing.eject_seconds")
    _check_pools(settings.pools, settings.models)
    for name, model in settings.models.items():
        key = f"models.{name}"
        if not model.input_schema_path.is_file():
            raise SettingsError(f"{key}.input_schema: no such file {model.input_schema_path}")
        if not 0 < model.default_max_tokens <= model.max_tokens_limit:
            raise SettingsError(f"{key}.default_max_tokens: must be between 1 and the max_tokens ceiling")
        template = model.chat_template_path
        if template is not None and not template.is_file():
            raise SettingsError(f"{key}.chat_template: no such file {template}")


def _check_pools(pools: Mapping[str, PoolSettings], models: Mapping[str, ModelSettings]) -> None:
    for name, pool in pools.items():
        urls = set()
        for index, worker in enumerate(pool.workers):
            key = f"pools.{name}.workers[{index}]"
            if not worker.url.startswith(("http://", "https://")):
                raise SettingsError(f"{key}: expected an http(s) URL, got {worker.url!r}")
            if worker.url.rstrip("/") in urls:
                raise SettingsError(f"{key}: {worker.url} is listed twice")
            urls.add(worker.url.rstrip("/"))
            if not worker.weight > 0:
                raise SettingsError(f"{key}.weight: must be greater than 0")
    for name, model in models.items():
        if model.pool not in pools:
            raise SettingsError(f"models.{name}.pool: no pool named {model.pool!r} under pools")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
