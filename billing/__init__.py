"""Tokens and money: prompt-token counting, prices, the billing policy, the ledger and API keys.

``billing`` never imports ``gateway`` or starlette.
"""

from billing.keys import ApiKey, InvalidTenantError, IssuedKey, KeyStore, hash_key, parse_key_id
from billing.ledger import COUNTER_FIELDS, Ledger, UsageRecord, hour_bucket, tenant_key
from billing.pricing import Price, cost_nano_usd, format_usd, price_of
from billing.prompts import BuiltinLlama31Template, ChatTemplate, JinjaChatTemplate, PromptCounter, raw_upper_bound
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
    "ApiKey",
    "BuiltinLlama31Template",
    "ChatTemplate",
    "ChatTemplateError",
    "Delivery",
    "InvalidTenantError",
    "IssuedKey",
    "JinjaChatTemplate",
    "KeyStore",
    "Ledger",
    "Price",
    "PromptCounter",
    "Settlement",
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
    "raw_upper_bound",
    "render_chat_prompt",
    "settle_usage",
    "tenant_key",
]
