"""The billing policy, in the one function that applies it."""

from __future__ import annotations

from billing import Delivery, Usage, parse_reported_count, settle_usage


def never_called(*args: object) -> int:
    raise AssertionError("the gateway's own counter was used although the worker reported usage")


def test_usage_nothing_answered_costs_nothing() -> None:
    delivery = Delivery(answered=False, max_tokens=10, reported_prompt_tokens=50, reported_completion_tokens=5)
    assert settle_usage(delivery, never_called, never_called) == Usage(0, 0)


def test_usage_reported_counts_are_used_and_bounded_by_max_tokens() -> None:
    delivery = Delivery(answered=True, max_tokens=10, reported_prompt_tokens=50, reported_completion_tokens=7)
    assert settle_usage(delivery, never_called, never_called) == Usage(50, 7)
    inflated = Delivery(answered=True, max_tokens=10, reported_prompt_tokens=50, reported_completion_tokens=900)
    assert settle_usage(inflated, never_called, never_called) == Usage(50, 10)


def test_usage_missing_report_is_counted_by_the_gateway() -> None:
    delivery = Delivery(answered=True, max_tokens=100, delivered_text="one two three")
    assert settle_usage(delivery, lambda: 42, lambda text: len(text.split())) == Usage(42, 3)
    assert settle_usage(Delivery(answered=True, max_tokens=1), lambda: 5, never_called) == Usage(5, 0)


def test_usage_reported_counts_must_be_non_negative_integers() -> None:
    assert [parse_reported_count(v) for v in (3, 0, -1, 2.0, "4", True, None)] == [3, 0, None, None, None, None, None]
    assert Usage(3, 4).as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
