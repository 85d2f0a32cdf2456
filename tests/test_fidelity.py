"""Fidelity: sliding-window perplexity as in HF's guide, and KL / top-1 agreement against a compact baseline.

A tiny random-weight Llama (vocabulary 256, context 256) with a word-level tokenizer made from the
bundled text's own words, built the way tests/conftest.py builds its tiny model: fast enough to run
the real windows of the real text, and with a vocabulary small enough to compute the full KL exactly.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from rayq.host.fidelity import DEFAULT_TEXT, Reference, measure, read_text, windows
from tests.conftest import tiny_llama, word_tokenizer

VOCAB = 256


@pytest.fixture(scope="module")
def lm() -> tuple[Any, Any]:
    torch.set_num_threads(1)
    counts = Counter(re.findall(r"\w+|[^\w\s]+", DEFAULT_TEXT.read_text(encoding="utf-8").lower()))
    tokenizer = word_tokenizer([w for w, _ in counts.most_common(VOCAB - 4)])
    return tiny_llama(VOCAB, max_position_embeddings=256).eval(), tokenizer


@pytest.fixture(scope="module")
def text() -> str:
    return read_text(None)[0]


@pytest.fixture(scope="module")
def perturbed(lm: tuple[Any, Any]) -> Any:
    model = copy.deepcopy(lm[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    return model


def hf_guide(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's loop transcribed: (begin, end, tokens the loss really counts: trg_len, less the one the shift drops)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        trg_len = end - prev_end
        labels = [-100] * (end - begin - trg_len) + list(range(end - trg_len, end))
        counted = sum(label != -100 for label in labels[1:])  # the model shifts labels by one
        if counted:
            out.append((begin, end, counted))
        prev_end = end
        if end == n_tokens:
            break
    return out


def test_windows_match_the_guide_and_score_every_token_after_the_first_once() -> None:
    for n in range(40):
        for window in range(2, 10):
            for stride in range(1, window):
                got = windows(n, window, stride)
                assert got == hf_guide(n, window, stride), (n, window, stride)
                scored = np.zeros(n, dtype=int)
                for begin, end, k in got:
                    assert end - begin <= window and begin < end - k  # every target has context in its window
                    scored[end - k : end] += 1
                assert scored[1:].tolist() == [1] * (n - 1) and (n == 0 or scored[0] == 0), (n, window, stride)
    assert windows(3232, 1024, 512)[-1] == (2560, 3232, 160) and len(windows(3232, 1024, 512)) == 6
    with pytest.raises(ValueError, match="stride"):
        windows(100, 8, 8)
    with pytest.raises(ValueError, match="at least 2"):
        windows(100, 1, 1)


def test_default_text_is_shipped_and_read_with_its_label(tmp_path) -> None:
    text, label = read_text(None)
    assert label == "rayq/fidelity.txt" and DEFAULT_TEXT.name == "fidelity.txt"
    assert 1800 <= len(text.split()) <= 2800 and text.isascii()
    other = tmp_path / "mine.txt"
    other.write_text("some words", encoding="utf-8")
    assert read_text(other) == ("some words", "mine.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_ppl_is_exp_mean_nll_of_one_plain_forward(lm, text) -> None:
    model, tok = lm
    fid, ref = measure(model, tok, text, window=256, stride=128, max_tokens=200)
    ids = torch.tensor([tok(text)["input_ids"][:200]])
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert fid.tokens == 199 and ref.n_positions == 199 and fid.kl_div is None and fid.top1_agreement is None
    assert fid.ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_ppl_follows_the_guide(lm, text) -> None:
    model, tok = lm
    ids = torch.tensor([tok(text)["input_ids"][:700]])
    fid, ref = measure(model, tok, text, max_tokens=700)  # window 1024 cut to the context 256, stride to 128
    assert (ref.window, ref.stride) == (256, 128)
    total, counted = 0.0, 0
    with torch.inference_mode():
        for begin, end, _ in hf_guide(700, 256, 128):
            trg_len = end - max(begin + 256 - 128, 0) if begin else end  # end - prev_end
            labels = ids[:, begin:end].clone()
            labels[:, :-trg_len] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids[:, begin:end], labels=labels).loss.item() * n
            counted += n
    assert fid.tokens == counted == 699
    assert fid.ppl == pytest.approx(math.exp(total / counted), rel=1e-5)


def test_the_model_against_its_own_reference(lm, text) -> None:
    model, tok = lm
    fid, ref = measure(model, tok, text, max_tokens=900)
    again, ref2 = measure(model, tok, text, max_tokens=900, reference=ref)
    assert abs(again.kl_div) < 1e-6 and again.top1_agreement == 1.0
    assert again.ppl == fid.ppl and again.tokens == fid.tokens == 899
    assert ref.top_k == 64 and np.array_equal(ref.ids, ref2.ids) and np.array_equal(ref.argmax, ref.ids[:, 0])
    assert np.all(np.diff(ref.logprobs, axis=1) <= 0)  # most likely first


def full_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """Every position's whole next-token distribution, from one plain forward (the text fits one window)."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)


def test_a_perturbed_copy_diverges_and_the_coarsened_kl_bounds_the_full_one(lm, perturbed, text) -> None:
    model, tok = lm
    ids = tok(text)["input_ids"][:250]
    lp, lq = full_logprobs(model, ids), full_logprobs(perturbed, ids)
    full_kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agreement = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    for k in (1, 8, 64, VOCAB):
        _, ref = measure(model, tok, text, max_tokens=250, top_k=k)
        fid, _ = measure(perturbed, tok, text, max_tokens=250, reference=ref)
        assert 0 < fid.kl_div <= full_kl * (1 + 1e-6), (k, fid.kl_div, full_kl)  # float32 logprobs: equal at K = VOCAB
        assert 0 < fid.top1_agreement < 1 and fid.top1_agreement == pytest.approx(agreement)
        if k == VOCAB:
            assert fid.kl_div == pytest.approx(full_kl, rel=1e-4)
    # The coarsened KL as defined, from the exact distributions, at K = 8.
    _, ref = measure(model, tok, text, max_tokens=250, top_k=8)
    fid, _ = measure(perturbed, tok, text, max_tokens=250, reference=ref)
    top = torch.from_numpy(ref.ids).long()
    p, q = lp.exp().gather(1, top), lq.exp().gather(1, top)
    p_rest, q_rest = (1 - p.sum(-1)).clamp_min(1e-12), (1 - q.sum(-1)).clamp_min(1e-12)
    coarse = (p * (p.log() - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    assert fid.kl_div == pytest.approx(coarse.mean().item(), rel=1e-4)


def test_a_reference_made_otherwise_is_refused(lm, text) -> None:
    model, tok = lm
    _, ref = measure(model, tok, text, max_tokens=300)
    with pytest.raises(ValueError, match="another text"):
        measure(model, tok, text + " More words.", max_tokens=300, reference=ref)
    with pytest.raises(ValueError, match=r"window 256 and stride 128.*window 200 and stride 100"):
        measure(model, tok, text, window=200, stride=100, max_tokens=300, reference=ref)
    with pytest.raises(ValueError, match="scores 299 positions, this model 399"):
        measure(model, tok, text, max_tokens=400, reference=ref)


def test_reference_round_trips_through_bytes(lm, text) -> None:
    model, tok = lm
    _, ref = measure(model, tok, text, max_tokens=500)
    data = ref.to_bytes()
    back = Reference.from_bytes(data)
    assert (back.text_sha, back.window, back.stride) == (ref.text_sha, ref.window, ref.stride)
    for name in ("ids", "logprobs", "argmax"):
        a, b = getattr(ref, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.ids.dtype == np.int32 and back.logprobs.dtype == np.float32 and back.ids.shape == (499, 64)
    assert len(data) < 499 * 64 * 8 + 4096
    with pytest.raises(ValueError, match="not a rayq fidelity reference"):
        Reference.from_bytes(b"not an npz")


def test_a_dynamic_cache_changes_nothing(lm, perturbed, text) -> None:
    from transformers import DynamicCache

    model, tok = lm
    fid, ref = measure(model, tok, text, max_tokens=700)
    cached, cached_ref = measure(
        model, tok, text, max_tokens=700, reference=ref, new_cache=lambda: DynamicCache(config=model.config)
    )
    assert cached.ppl == pytest.approx(fid.ppl, rel=1e-5) and cached.tokens == fid.tokens
    assert abs(cached.kl_div) < 1e-6 and cached.top1_agreement == 1.0
    np.testing.assert_allclose(cached_ref.logprobs, ref.logprobs, atol=1e-4)
    plain, _ = measure(perturbed, tok, text, max_tokens=700, reference=ref)
    via_cache, _ = measure(
        perturbed, tok, text, max_tokens=700, reference=ref, new_cache=lambda: DynamicCache(config=perturbed.config)
    )
    assert via_cache.kl_div == pytest.approx(plain.kl_div, rel=1e-4)
    assert via_cache.top1_agreement == plain.top1_agreement


def test_a_lossy_cache_is_seen_by_the_scored_tokens(lm, text) -> None:
    """Like transformers' QuantizedCache, this cache lets a forward attend to what it adds as given and
    to what earlier forwards stored only through a lossy copy: one forward per window would never see it."""
    from transformers import DynamicCache

    class LossyCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
            past = self.get_seq_length(layer_idx)
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)

            def lossy(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([torch.round(t[..., :past, :] * 2) / 2, t[..., past:, :]], dim=-2)

            return lossy(keys), lossy(values)

    model, tok = lm
    _, ref = measure(model, tok, text, max_tokens=700)
    fid, _ = measure(model, tok, text, max_tokens=700, reference=ref, new_cache=lambda: LossyCache(config=model.config))
    assert fid.kl_div > 1e-4 and fid.top1_agreement < 1
