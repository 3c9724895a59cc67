"""Reading a ``/metrics`` page in tests: every sample, and sums over the labels a test names."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, Mapping[str, str], float]


def samples(text: str) -> list[Sample]:
    """Every sample of an exposition page: (name with its suffix, labels, value)."""
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(page: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for sample_name, sample_labels, value in page
        if sample_name == name and all(sample_labels.get(key) == wanted for key, wanted in labels.items())
    )


def label_values(page: list[Sample], name: str, label: str) -> set[str]:
    return {sample_labels[label] for sample_name, sample_labels, _ in page if sample_name == name}
