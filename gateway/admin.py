"""Usage reports for tenants, and the admin API for operators: keys, budgets and usage across tenants.

Every answer is a Workers AI envelope (``{"result": ..., "success": true, "errors": [], "messages": []}``), and
every object a route touches is checked against the caller: a tenant's key reads only its own account's usage
(another account's path answers 404, as inference does), and the admin routes need the ``admin`` scope or the
bootstrap admin token.

Routes::

    GET    /client/v4/accounts/{account_id}/ai/usage       a tenant's own usage (scope usage:read); ?format=csv
    GET    /client/v4/accounts/{account_id}/ai/budget      a tenant's own budget and spend this month (usage:read)
    GET    /client/v4/user/tokens/verify                   who the bearer is: key id, account, scopes, expiry (any
                                                           valid key or the admin token; also /user/tokens/verify)
    GET    /admin/v1/usage                                 usage across tenants (?tenant=a,b&group_by=tenant; so
                                                           grouped, a bucket lists only the tenants with usage)
    GET    /admin/v1/tenants                               every tenant, with budget and spend this month
    POST   /admin/v1/keys                                  create a key (its secret is in this answer only)
    GET    /admin/v1/keys?tenant=                          list keys
    GET    /admin/v1/keys/{key_id}                         one key
    PATCH  /admin/v1/keys/{key_id}                         set its monthly budget and/or rate limits
    DELETE /admin/v1/keys/{key_id}                         revoke it
    POST   /admin/v1/keys/{key_id}/rotate                  issue a successor, retire it (now or after a grace)
    GET    /admin/v1/tenants/{tenant}/budget               a tenant's budget and spend this month
    PUT    /admin/v1/tenants/{tenant}/budget               set ({"monthly_budget_usd": "25.00"} or null: no cap)
    DELETE /admin/v1/tenants/{tenant}/budget               back to the configured default
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio.to_thread
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billing import (
    SCOPES,
    ApiKey,
    InvalidBudgetError,
    InvalidKeySettingError,
    KeyLimits,
    ReportQueryError,
    UsageReport,
    check_tenant,
    format_usd,
    month_bounds,
    month_of,
    parse_query,
    parse_time,
    parse_usd,
    usage_report,
)
from config import SettingsError
from gateway.deps import Dependencies
from gateway.errors import (
    InvalidQueryError,
    InvalidRequestError,
    KeyStoreUnavailableError,
    NotFoundError,
    render_result,
)
from gateway.validate import parse_body

# Building and encoding a report costs about 4 µs per result. Up to this many (about 4 ms) it stays on the event loop:
# a tenant's own day of hours (24 to 100 results, 0.2 to 0.5 ms) takes two to three times as long with the hop to a
# thread.
_RENDER_ON_LOOP_MAX_RESULTS: Final = 1000


def routes() -> list[Route]:
    """The usage and admin routes (the tenant's under both ``/client/v4/accounts/...`` and ``/accounts/...``)."""
    tenant_routes = []
    for prefix in ("/client/v4", ""):
        tenant_routes += [
            Route(prefix + "/accounts/{account_id}/ai/usage", tenant_usage, methods=["GET"]),
            Route(prefix + "/accounts/{account_id}/ai/budget", tenant_budget, methods=["GET"]),
        ]
    return [
        *tenant_routes,
        Route("/client/v4/user/tokens/verify", verify_token, methods=["GET"]),
        Route("/user/tokens/verify", verify_token, methods=["GET"]),
        Route("/admin/v1/usage", admin_usage, methods=["GET"]),
        Route("/admin/v1/tenants", list_tenants, methods=["GET"]),
        Route("/admin/v1/keys", create_key, methods=["POST"]),
        Route("/admin/v1/keys", list_keys, methods=["GET"]),
        Route("/admin/v1/keys/{key_id}", get_key, methods=["GET"]),
        Route("/admin/v1/keys/{key_id}", update_key, methods=["PATCH"]),
        Route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/admin/v1/keys/{key_id}/rotate", rotate_key, methods=["POST"]),
        Route("/admin/v1/tenants/{tenant}/budget", get_budget, methods=["GET"]),
        Route("/admin/v1/tenants/{tenant}/budget", set_budget, methods=["PUT"]),
        Route("/admin/v1/tenants/{tenant}/budget", reset_budget, methods=["DELETE"]),
        Route("/admin/v1/pools", list_pools, methods=["GET"]),
        Route("/admin/v1/pools/reload", reload_pools, methods=["POST"]),
    ]


# -- a tenant's own ----------------------------------------------------------------------------------------------


async def tenant_usage(request: Request) -> Response:
    deps = _deps(request)
    key = await _usage_reader(request, deps)
    return await _usage(request, deps, tenants=[key.tenant], operator=False)


async def tenant_budget(request: Request) -> Response:
    deps = _deps(request)
    key = await _usage_reader(request, deps)
    return render_result(await _budget_status(deps, key.tenant, key))


async def _usage_reader(request: Request, deps: Dependencies) -> ApiKey:
    """The path's account's key with ``usage:read``, noted for the access log."""
    account = request.path_params["account_id"]
    key = await deps.auth.authenticate(request.headers, account, request.url.path, scope="usage:read")
    request.state.facts.tenant, request.state.facts.key_id = key.tenant, key.key_id
    return key


async def verify_token(request: Request) -> Response:
    """Cloudflare's token check: the bearer's key id, status, expiry, account and scopes, for any valid key."""
    deps = _deps(request)
    key = await _redis(deps, deps.auth.identify(request.headers))
    if key is not None:
        request.state.facts.tenant, request.state.facts.key_id = key.tenant, key.key_id
    if key is None:  # the bootstrap admin token: no key, no account behind it
        return render_result(
            {
                "id": "admin-token",
                "status": "active",
                "expires_on": None,
                "account_id": None,
                "name": "bootstrap admin token",
                "scopes": ["admin"],
            }
        )
    return render_result(
        {
            "id": key.key_id,
            "status": "active",  # a revoked or expired key never gets here: it is a 401
            "expires_on": None if key.expires_at is None else _iso(key.expires_at),
            "account_id": key.tenant,
            "name": key.name,
            "scopes": sorted(key.scopes),
        }
    )


# -- operators ---------------------------------------------------------------------------------------------------


async def admin_usage(request: Request) -> Response:
    deps = await _admin(request)
    named = request.query_params.get("tenant")
    if named is None:
        tenants = await _redis(deps, deps.keys.tenants())  # none yet on a new install: a report of zeros
    else:
        tenants = [_tenant(name) for name in named.split(",") if name]
        if not tenants:
            raise InvalidQueryError("'tenant': expected one or more account ids, comma-separated")
    return await _usage(request, deps, tenants=tenants, operator=True)


async def list_tenants(request: Request) -> Response:
    deps = await _admin(request)
    tenants = await _redis(deps, deps.keys.tenants())
    month = month_of(deps.clock())
    caps = await _redis(deps, deps.budgets.tenant_budgets(tenants), "usage")
    spent = await _redis(deps, deps.ledger.month_spends(tenants, month), "usage")
    period = _period(month)
    return render_result([_month_status(*row, period) for row in zip(tenants, caps, spent, strict=True)])


async def list_pools(request: Request) -> Response:
    """Every pool's workers as this replica sees them: health, requests in flight, load, catalog."""
    deps = await _admin(request)
    return render_result([pool.status() for pool in deps.pools.values()])


async def reload_pools(request: Request) -> Response:
    """Re-read the pools from the configuration now (this replica; the others do within their reload interval)."""
    deps = await _admin(request)
    try:
        changed = deps.reloader.reload()
    except SettingsError as exc:
        raise InvalidQueryError(f"the configuration's pools were not applied: {exc}") from None
    await deps.monitor.check_now()
    return render_result({"changed": changed, "pools": [pool.status() for pool in deps.pools.values()]})


async def create_key(request: Request) -> Response:
    deps = await _admin(request)
    body = await _body(request)
    _only(body, {"tenant", "name", "scopes", "expires_at", "expires_in_seconds", "monthly_budget_usd", "limits"})
    tenant = body.get("tenant")
    if not isinstance(tenant, str):
        raise InvalidQueryError("'tenant': required, the account id the key belongs to")
    name = body.get("name", "")
    scopes = body.get("scopes", ["inference", "usage:read"])
    if not isinstance(name, str) or len(name) > 200:
        raise InvalidQueryError("'name': expected a string of at most 200 characters")
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise InvalidQueryError(f"'scopes': expected a list of {', '.join(SCOPES)}")
    try:
        issued = await _redis(
            deps,
            deps.keys.create(
                tenant,
                name,
                scopes=scopes,
                expires_at=_expiry(body, deps.clock()),
                monthly_budget_nano_usd=_budget_field(body),
                limits=_limits_field(body, KeyLimits()),
            ),
        )
    except InvalidKeySettingError as exc:
        raise InvalidQueryError(str(exc)) from None
    return render_result({**issued.record.as_dict(), "key": issued.secret_key}, status=201)


async def list_keys(request: Request) -> Response:
    deps = await _admin(request)
    tenant = request.query_params.get("tenant")
    keys = await _redis(deps, deps.keys.list_keys(_tenant(tenant) if tenant else None))
    return render_result([key.as_dict() for key in keys])


async def get_key(request: Request) -> Response:
    deps = await _admin(request)
    return render_result((await _key(deps, request)).as_dict())


async def update_key(request: Request) -> Response:
    deps = await _admin(request)
    key = await _key(deps, request)
    body = await _body(request)
    _only(body, {"monthly_budget_usd", "limits"})
    if not body:
        raise InvalidQueryError("'monthly_budget_usd': give it (\"5.00\", or null for none) and/or 'limits'")
    updated: ApiKey | None = key
    if "monthly_budget_usd" in body:
        updated = await _redis(deps, deps.keys.set_budget(key.key_id, _budget_field(body)))
    if "limits" in body and updated is not None:
        updated = await _redis(deps, deps.keys.set_limits(key.key_id, _limits_field(body, key.limits)))
    if updated is None:
        raise NotFoundError(f"No key with id {key.key_id}")
    return render_result(updated.as_dict())


async def revoke_key(request: Request) -> Response:
    deps = await _admin(request)
    key = await _key(deps, request)
    revoked = await _redis(deps, deps.keys.revoke(key.key_id))
    if revoked is None:
        raise NotFoundError(f"No key with id {key.key_id}")
    return render_result(revoked.as_dict())


async def rotate_key(request: Request) -> Response:
    deps = await _admin(request)
    key = await _key(deps, request)
    body = await _body(request, optional=True)
    _only(body, {"grace_seconds"})
    grace = body.get("grace_seconds", 0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 30 * 86400:
        raise InvalidQueryError("'grace_seconds': expected a number of seconds from 0 to 2592000 (30 days)")
    rotated = await _redis(deps, deps.keys.rotate(key.key_id, grace_seconds=float(grace)))
    if rotated is None:
        raise InvalidQueryError(f"key {key.key_id} is revoked or expired: create a new key instead")
    issued, retired = rotated
    return render_result(
        {"new": {**issued.record.as_dict(), "key": issued.secret_key}, "old": retired.as_dict()}, status=201
    )


async def get_budget(request: Request) -> Response:
    deps = await _admin(request)
    return render_result(await _budget_status(deps, _tenant(request.path_params["tenant"])))


async def set_budget(request: Request) -> Response:
    deps = await _admin(request)
    tenant = _tenant(request.path_params["tenant"])
    body = await _body(request)
    _only(body, {"monthly_budget_usd"})
    if "monthly_budget_usd" not in body:
        raise InvalidQueryError("'monthly_budget_usd': required (an amount such as \"25.00\", or null for no cap)")
    await _redis(deps, deps.budgets.set_tenant_budget(tenant, _budget_field(body)))
    return render_result(await _budget_status(deps, tenant))


async def reset_budget(request: Request) -> Response:
    deps = await _admin(request)
    tenant = _tenant(request.path_params["tenant"])
    await _redis(deps, deps.budgets.reset_tenant_budget(tenant))
    return render_result(await _budget_status(deps, tenant))


# -- shared -------------------------------------------------------------------------------------------------------


async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object (``{}`` for an empty optional body); a bad one is a 400 in admin words."""
    raw = await request.body()
    if optional and not raw.strip():
        return {}
    try:
        return parse_body(raw)
    except InvalidRequestError as exc:
        raise InvalidQueryError(exc.message.removeprefix("AiError: Bad input: ")) from None


def _deps(request: Request) -> Dependencies:
    deps: Dependencies = request.app.state.deps
    return deps


async def _admin(request: Request) -> Dependencies:
    deps = _deps(request)
    await deps.auth.authenticate_admin(request.headers)
    return deps


async def _redis(deps: Dependencies, awaitable: Any, operation: str = "admin") -> Any:
    """Await a Redis-backed call; Redis trouble is a 503, never a 500 (counted by ``operation``: usage, admin)."""
    try:
        return await awaitable
    except RedisError as exc:
        deps.metrics.redis_errors.labels(operation).inc()
        raise KeyStoreUnavailableError() from exc


async def _usage(request: Request, deps: Dependencies, *, tenants: list[str], operator: bool) -> Response:
    params = dict(request.query_params)
    output = params.pop("format", "json")
    if operator:
        params.pop("tenant", None)
    if output not in ("json", "csv"):
        raise InvalidQueryError("'format': expected json or csv")
    try:
        query = parse_query(params, tenants=tenants, now=deps.clock(), allow_group_by_tenant=operator)
    except ReportQueryError as exc:
        raise InvalidQueryError(str(exc)) from None
    report = await _redis(deps, usage_report(deps.redis, query, models=list(deps.settings.models)), "usage")
    if output == "csv":
        return await _render(report, _csv_response)
    return await _render(report, lambda page: render_result(page.as_dict()))


def _csv_response(report: UsageReport) -> Response:
    query = report.query
    filename = f"tollgate-usage-{query.granularity}-{query.start}-{query.end}.csv"
    return Response(
        report.to_csv(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


async def _render(report: UsageReport, render: Callable[[UsageReport], Response]) -> Response:
    """``render(report)``, in a worker thread for a big report, so that the other requests of this process (streams,
    ``/healthz``) go on meanwhile: an operator's week of hours over 3,000 tenants, then 504,000 results with the
    zeros, took about 2.5 s to render on the event loop."""
    if report.result_count <= _RENDER_ON_LOOP_MAX_RESULTS:
        return render(report)
    return await anyio.to_thread.run_sync(render, report)


async def _budget_status(deps: Dependencies, tenant: str, key: ApiKey | None = None) -> dict[str, Any]:
    """A tenant's (and, for a tenant's own request, its key's) cap and spend in the current month (UTC)."""
    month = month_of(deps.clock())
    cap = await _redis(deps, deps.budgets.tenant_budget(tenant), "usage")
    spent = await _redis(deps, deps.ledger.month_spend(tenant, month), "usage")
    status = _month_status(tenant, cap, spent, _period(month))
    if key is not None:
        key_spent = await _redis(deps, deps.ledger.month_spend(tenant, month, key.key_id), "usage")
        key_cap = key.monthly_budget_nano_usd
        status["key"] = {
            "id": key.key_id,
            "monthly_budget_nano_usd": key_cap,
            "monthly_budget_usd": None if key_cap is None else format_usd(key_cap),
            "spent_nano_usd": key_spent,
            "spent_usd": format_usd(key_spent),
        }
    return status


def _period(month: str) -> dict[str, str]:
    """``month`` (``YYYYMM``) and when the next begins, as a budget status shows them."""
    return {"month": f"{month[:4]}-{month[4:]}", "resets_at": _iso(month_bounds(month)[1])}


def _month_status(tenant: str, cap: tuple[int | None, bool], spent: int, period: dict[str, str]) -> dict[str, Any]:
    """A tenant's cap (``(nano-dollars or None, is the default)``) and spend in the month of ``period``."""
    nano_usd, is_default = cap
    return {
        "tenant": tenant,
        **period,
        "monthly_budget_nano_usd": nano_usd,
        "monthly_budget_usd": None if nano_usd is None else format_usd(nano_usd),
        "budget_is_default": is_default,
        "spent_nano_usd": spent,
        "spent_usd": format_usd(spent),
    }


async def _key(deps: Dependencies, request: Request) -> ApiKey:
    key_id = request.path_params["key_id"]
    key = await _redis(deps, deps.keys.get(key_id))
    if key is None:
        raise NotFoundError(f"No key with id {key_id}")
    return key


def _tenant(name: str) -> str:
    try:
        return check_tenant(name)
    except InvalidKeySettingError as exc:
        raise InvalidQueryError(str(exc)) from None


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidQueryError(f"'{unknown[0]}': unknown field; expected {', '.join(sorted(allowed))}")


def _budget_field(body: Mapping[str, Any]) -> int | None:
    value = body.get("monthly_budget_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidQueryError("'monthly_budget_usd': expected an amount such as \"25.00\", or null")
    try:
        return parse_usd(str(value))
    except InvalidBudgetError as exc:
        raise InvalidQueryError(f"'monthly_budget_usd': {exc}") from None


def _limits_field(body: Mapping[str, Any], current: KeyLimits) -> KeyLimits:
    """``limits`` of a body: the names given replace ``current``'s (null: the tenant's limit, 0: none)."""
    given = body.get("limits", {})
    names = {field.name for field in dataclasses.fields(KeyLimits)}
    if not isinstance(given, dict) or set(given) - names:
        raise InvalidQueryError(f"'limits': expected an object with {', '.join(sorted(names))}")
    try:
        return dataclasses.replace(current, **given)
    except InvalidKeySettingError as exc:
        raise InvalidQueryError(f"'limits': {exc}") from None


def _expiry(body: Mapping[str, Any], now: float) -> float | None:
    if "expires_at" in body and "expires_in_seconds" in body:
        raise InvalidQueryError("'expires_at': give either expires_at or expires_in_seconds, not both")
    seconds = body.get("expires_in_seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 10 * 366 * 86400:
            raise InvalidQueryError("'expires_in_seconds': expected a positive number of seconds, at most 10 years")
        return now + seconds
    at = body.get("expires_at")
    if at is None:
        return None
    try:
        expires_at = float(parse_time(str(at), "expires_at"))
    except ReportQueryError as exc:
        raise InvalidQueryError(str(exc)) from None
    if expires_at <= now:
        raise InvalidQueryError("'expires_at': must lie in the future")
    return expires_at


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
