"""The prompt token bound: at most how many tokens a tokenizer makes of a text, without one.

Two callers need it before anything loads: the context check (rayq.planning.context: does a
prompt plus max_new_tokens fit the model's context?) and the memory estimate (rayq.planning.placement:
how many tokens the KV cache must hold). Loading a tokenizer means importing transformers, which
takes seconds `rayq plan` should not pay, so the text alone bounds the count.

Every token a tokenizer makes covers at least one byte of its normalized text: byte-level BPE
(GPT-2, Llama 3, SmolLM2) merges bytes, SentencePiece with byte fallback (Llama 2, Mistral)
spells a character it lacks as its UTF-8 bytes, and word or character vocabularies cover at
least a character each. So the tokens are at most the UTF-8 bytes of the normalized text plus
the few the tokenizer adds on its own (BOS, EOS, SentencePiece's leading space). It holds for
any script: a CJK character is 3 bytes and an emoji 4, where a bound in characters (the memory
estimate's old `characters / 2 + 16`, an English average) falls short. rayq feeds the prompt as
it is, with the tokenizer's own special tokens and no chat template (rayq.host.decode,
rayq.host.batch_decode), so no template's tokens are added.

Standard library only.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

# Tokens a tokenizer may add beyond those covering the text: BOS, EOS, a leading-space piece, a spare.
ADDED_TOKENS = 4


def prompt_token_bound(text: str) -> int:
    """At least as many tokens as any tokenizer makes of `text`, special tokens included.

    A normalizer may decompose or case-fold characters into more bytes than they had (é in
    NFD is three bytes, not two), so the longest of those forms counts; ASCII has one form.
    """
    if text.isascii():
        n = len(text)
    else:
        forms = (text, unicodedata.normalize("NFKD", text), unicodedata.normalize("NFKD", text.casefold()))
        n = max(len(f.encode("utf-8")) for f in forms)
    return n + ADDED_TOKENS


def longest_prompt_bound(texts: Iterable[str]) -> int:
    """The bound of the longest of `texts` (0 for none): what one KV cache slot must hold of a prompt."""
    return max((prompt_token_bound(t) for t in texts), default=0)
