"""Content words and duplicate content words, as defined by Roy 2023.

Content words are the words left after removing stop words; a duplicate is each repeat
of a content word already seen in the same completion. The stop-word list is the English
list of the `stop-words` package (1,333 words), not one of our own, so the number is
reproducible by anyone with that package.
"""

from __future__ import annotations

import re
from functools import lru_cache

from rayq.host.metrics.registry import Finished, register

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    from stop_words import get_stop_words

    return frozenset(get_stop_words("english"))


def content_words(text: str) -> list[str]:
    stops = stop_words()
    return [w for w in _WORD.findall(text.lower()) if w not in stops]


def duplicate_count(words: list[str]) -> int:
    return len(words) - len(set(words))


@register("content_words")
def content_word_metrics(done: Finished) -> dict[str, int]:
    words = content_words(done.text)
    return {"content_words": len(words), "duplicate_content_words": duplicate_count(words)}
