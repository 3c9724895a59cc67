"""Tokens and money: prompt-token counting, prices, the billing policy, the ledger and API keys.

``billing`` never imports ``gateway`` or starlette.
"""

from billing.budgets import Budgets, InvalidBudgetError, month_bounds, parse_usd
from billing.keys import (
    DEFAULT_SCOPES,
    SCOPES,
    ApiKey,
    InvalidKeySettingError,
    InvalidTenantError,
    IssuedKey,
    KeyLimits,
    KeyStore,
    check_scopes,
    check_tenant,
    hash_key,
    parse_key_id,
)
from billing.ledger import (
    COUNTER_FIELDS,
    Ledger,
    Retention,
    UsageRecord,
    hour_bucket,
    month_of,
    rate_keys,
    tenant_key,
)
from billing.limits import AdmissionDecision, Limiter, Limits
from billing.pricing import Price, cost_nano_usd, format_usd, price_of
from billing.prompts import BuiltinLlama31Template, ChatTemplate, JinjaChatTemplate, PromptCounter, raw_upper_bound
from billing.reports import (
    ReportQueryError,
    UsageQuery,
    UsageReport,
    parse_query,
    parse_time,
    usage_report,
)
from billing.spool import BillOutcome, DurableLedger, Spool, check_writable
from billing.tokens import (
    ChatTemplateError,
    Tokenizer,
    count_chat_prompt_tokens,
    count_raw_prompt_tokens,
    render_chat_prompt,
)
from billing.usage import COMPLETION_TOLERANCE, Delivery, Settlement, Usage, parse_reported_count, settle_usage

__all__ = [
    "COMPLETION_TOLERANCE",
    "COUNTER_FIELDS",
    "DEFAULT_SCOPES",
    "SCOPES",
    "AdmissionDecision",
    "ApiKey",
    "BillOutcome",
    "Budgets",
    "BuiltinLlama31Template",
    "ChatTemplate",
    "ChatTemplateError",
    "Delivery",
    "DurableLedger",
    "InvalidBudgetError",
    "InvalidKeySettingError",
    "InvalidTenantError",
    "IssuedKey",
    "JinjaChatTemplate",
    "KeyLimits",
    "KeyStore",
    "Ledger",
    "Limiter",
    "Limits",
    "Price",
    "PromptCounter",
    "ReportQueryError",
    "Retention",
    "Settlement",
    "Spool",
    "Tokenizer",
    "Usage",
    "UsageQuery",
    "UsageRecord",
    "UsageReport",
    "check_scopes",
    "check_tenant",
    "check_writable",
    "cost_nano_usd",
    "count_chat_prompt_tokens",
    "count_raw_prompt_tokens",
    "format_usd",
    "hash_key",
    "hour_bucket",
    "month_bounds",
    "month_of",
    "parse_key_id",
    "parse_query",
    "parse_reported_count",
    "parse_time",
    "parse_usd",
    "price_of",
    "rate_keys",
    "raw_upper_bound",
    "render_chat_prompt",
    "settle_usage",
    "tenant_key",
    "usage_report",
]
