"""Content words and duplicates as the paper defines them, and the metric registry."""

from __future__ import annotations

from rayq.host import metrics
from rayq.host.metrics.words import content_words, duplicate_count


def test_content_words_drop_stop_words() -> None:
    words = content_words("The cat sat on the mat, and the cat was happy.")
    assert words == ["cat", "sat", "mat", "cat", "happy"]
    assert duplicate_count(words) == 1


def test_each_repeat_counts_once() -> None:
    words = content_words("London London London bridge bridge river")
    assert duplicate_count(words) == 3  # two repeats of london, one of bridge


def test_registry_fills_every_metric_column() -> None:
    out = metrics.compute_all(metrics.Finished("Rain rain in Spain.", 3, 5, 0.5, 0.1))
    assert out == {"tokens_per_s": 10.0, "content_words": 3, "duplicate_content_words": 1}
    assert set(metrics.REGISTRY) == {"speed", "content_words"}
