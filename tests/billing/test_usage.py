"""The billing policy, in the one function that applies it."""

from __future__ import annotations

from billing import Delivery, Settlement, Usage, parse_reported_count, settle_usage


def never_called(*args: object) -> int:
    raise AssertionError("a counter was used for a request that was never answered")


def words(text: str) -> int:
    return len(text.split())


def test_usage_nothing_answered_costs_nothing_and_counts_nothing() -> None:
    delivery = Delivery(answered=False, max_tokens=10, reported_prompt_tokens=50, reported_completion_tokens=5)
    assert settle_usage(delivery, never_called, never_called) == Settlement(Usage(0, 0))


def test_usage_prompt_is_always_the_gateways_own_count() -> None:
    honest = Delivery(
        answered=True, max_tokens=10, delivered_text="a b c", reported_prompt_tokens=42, reported_completion_tokens=3
    )
    assert settle_usage(honest, lambda: 42, words) == Settlement(Usage(42, 3))
    inflated = Delivery(
        answered=True,
        max_tokens=10,
        delivered_text="a b c",
        reported_prompt_tokens=999_999,
        reported_completion_tokens=3,
    )
    assert settle_usage(inflated, lambda: 42, words) == Settlement(Usage(42, 3), ("prompt",))


def test_usage_completion_is_the_workers_bounded_by_max_tokens() -> None:
    end_of_turn = Delivery(answered=True, max_tokens=10, delivered_text="a b c", reported_completion_tokens=4)
    assert settle_usage(end_of_turn, lambda: 5, words) == Settlement(Usage(5, 4))  # within the tolerance
    inflated = Delivery(answered=True, max_tokens=10, delivered_text="a b c", reported_completion_tokens=900)
    assert settle_usage(inflated, lambda: 5, words) == Settlement(Usage(5, 10), ("completion",))
    understated = Delivery(answered=True, max_tokens=100, delivered_text="a " * 20, reported_completion_tokens=2)
    assert settle_usage(understated, lambda: 5, words) == Settlement(Usage(5, 2), ("completion",))


def test_usage_missing_report_is_counted_by_the_gateway() -> None:
    delivery = Delivery(answered=True, max_tokens=100, delivered_text="one two three")
    assert settle_usage(delivery, lambda: 42, words) == Settlement(Usage(42, 3))
    assert settle_usage(Delivery(answered=True, max_tokens=1), lambda: 5, words) == Settlement(Usage(5, 0))


def test_usage_reported_counts_must_be_non_negative_integers() -> None:
    assert [parse_reported_count(v) for v in (3, 0, -1, 2.0, "4", True, None)] == [3, 0, None, None, None, None, None]
    assert Usage(3, 4).as_dict() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
