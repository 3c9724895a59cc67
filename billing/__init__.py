"""Tokens and money: prompt-token counting, prices, the billing policy, the ledger and API keys.

``billing`` never imports ``gateway`` or starlette.
"""

from billing.keys import ApiKey, InvalidTenantError, IssuedKey, KeyStore, hash_key, parse_key_id
from billing.ledger import COUNTER_FIELDS, Ledger, UsageRecord, hour_bucket, tenant_key
from billing.pricing import Price, cost_nano_usd, format_usd, price_of
from billing.tokens import (
    ChatTemplateError,
    Tokenizer,
    count_chat_prompt_tokens,
    count_raw_prompt_tokens,
    render_chat_prompt,
)
from billing.usage import Delivery, Usage, parse_reported_count, settle_usage

__all__ = [
    "COUNTER_FIELDS",
    "ApiKey",
    "ChatTemplateError",
    "Delivery",
    "InvalidTenantError",
    "IssuedKey",
    "KeyStore",
    "Ledger",
    "Price",
    "Tokenizer",
    "Usage",
    "UsageRecord",
    "cost_nano_usd",
    "count_chat_prompt_tokens",
    "count_raw_prompt_tokens",
    "format_usd",
    "hash_key",
    "hour_bucket",
    "parse_key_id",
    "parse_reported_count",
    "price_of",
    "render_chat_prompt",
    "settle_usage",
    "tenant_key",
]
