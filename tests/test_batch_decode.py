"""Batched decoding: greedy equals serial, a row's seed alone decides its text, same statistics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayq.host.batch_decode import Row, choose_tokens, generate_batch
from rayq.host.decode import generate_one
from rayq.host.metrics.words import content_words, duplicate_count

PROMPTS = [
    "life in london",
    "it is easy to be a techie",
    "hello my name is",
    "percentage of people adore actors and singers",
    "exercise and eating habits for",
]
GREEDY = {
    "max_new_tokens": 12,
    "temperature": 1.0,
    "top_k": 1,
    "top_p": 1.0,
    "do_sample": False,
    "repetition_penalty": 1.0,
}
SAMPLED = {**GREEDY, "do_sample": True, "top_k": 50, "temperature": 1.0}


@pytest.fixture(scope="module")
def lm(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def test_greedy_batched_equals_serial_despite_padding(lm) -> None:
    model, tok = lm
    rows = [Row(p, {**GREEDY, "max_new_tokens": 6 + 3 * i}, seed=i) for i, p in enumerate(PROMPTS)]
    batched = generate_batch(model, tok, rows)
    for r, b in zip(rows, batched, strict=True):
        s = generate_one(model, tok, r.prompt, r.params, r.seed)
        # Exact on this model; left padding changes logits only by float rounding, which
        # can flip a greedy choice only at a near-tie.
        assert b.text == s.text and b.n_new_tokens == s.n_new_tokens == r.params["max_new_tokens"]
        assert b.n_prompt_tokens == s.n_prompt_tokens


def test_rows_that_ended_leave_the_batch_and_the_rest_is_unchanged(lm) -> None:
    model, tok = lm
    rows = [Row(p, {**SAMPLED, "max_new_tokens": 2 if i < 4 else 10}, seed=i) for i, p in enumerate(PROMPTS * 2)]
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = generate_batch(model, tok, rows)
    finally:
        hook.remove()
    assert sizes[:2] == [10, 10] and set(sizes[2:]) == {6}, sizes  # 4 rows ended after 2 tokens
    for r, o in zip(rows, out, strict=True):
        assert o.text == generate_batch(model, tok, [r])[0].text and o.n_new_tokens == r.params["max_new_tokens"]


def _forward_shapes(model):
    """(batch rows, input positions) of every forward pass, recorded by a hook."""
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return shapes, hook


def test_waiting_rows_join_as_rows_end_and_keep_the_batch_full(lm) -> None:
    model, tok = lm
    lengths = [3, 9, 5, 12, 4, 7, 3, 10, 6, 8, 4, 11, 5, 9, 6]
    rows = [Row(PROMPTS[i % 5], {**SAMPLED, "max_new_tokens": n}, seed=i) for i, n in enumerate(lengths)]
    shapes, hook = _forward_shapes(model)
    try:
        out = generate_batch(model, tok, rows, batch_size=4)
    finally:
        hook.remove()
    prefills = [b for b, positions in shapes if positions > 1]
    steps = [b for b, positions in shapes if positions == 1]
    assert sum(prefills) == len(rows) and len(prefills) > 1  # every prompt ran once; rows joined later
    assert max(steps) <= 4
    # Each row's first token comes from its prefill, the rest from decoding steps: a step
    # decoded only live rows (at batch 4 an ended row leaves at once and a waiting one joins).
    assert sum(steps) == sum(n - 1 for n in lengths)
    for r, o in zip(rows, out, strict=True):
        assert o.n_new_tokens == r.params["max_new_tokens"]
        assert o.text == generate_batch(model, tok, [r])[0].text  # joining late changed nothing
        assert 0 < o.ttft_s <= o.latency_s


def test_greedy_rows_that_joined_late_equal_serial(lm) -> None:
    model, tok = lm
    rows = [Row(p, {**GREEDY, "max_new_tokens": 3 + 2 * i}, seed=i) for i, p in enumerate(PROMPTS + PROMPTS[::-1])]
    for r, b in zip(rows, generate_batch(model, tok, rows, batch_size=2), strict=True):
        assert b.text == generate_one(model, tok, r.prompt, r.params, r.seed).text


def test_repetition_penalty_matches_serial(lm) -> None:
    model, tok = lm
    params = {**GREEDY, "repetition_penalty": 1.3}
    batched = generate_batch(model, tok, [Row(p, params, 0) for p in PROMPTS])
    assert [b.text for b in batched] == [generate_one(model, tok, p, params, 0).text for p in PROMPTS]


def test_a_rows_text_depends_on_its_seed_not_its_batch(lm) -> None:
    model, tok = lm
    target = Row(PROMPTS[0], SAMPLED, seed=1234)
    alone = generate_batch(model, tok, [target])[0].text
    others = [
        Row(p, {**SAMPLED, "temperature": 0.5 + 0.1 * i, "max_new_tokens": 3 + i}, 77 + i)
        for i, p in enumerate(PROMPTS[1:])
    ]
    for batch in ([*others, target], [others[0], target], [target, *reversed(others)]):
        out = generate_batch(model, tok, batch)
        assert out[batch.index(target)].text == alone
    assert generate_batch(model, tok, [Row(target.prompt, SAMPLED, seed=999)])[0].text != alone


def test_per_row_parameters_are_honoured(lm) -> None:
    model, tok = lm
    rows = [
        Row(PROMPTS[0], {**SAMPLED, "top_k": 1}, 5),  # top_k 1 samples the argmax
        Row(PROMPTS[0], {**SAMPLED, "temperature": 0.0}, 6),  # temperature 0 is greedy
        Row(PROMPTS[0], GREEDY, 7),
        Row(PROMPTS[1], {**SAMPLED, "max_new_tokens": 3}, 8),
    ]
    out = generate_batch(model, tok, rows)
    assert out[0].text == out[1].text == out[2].text
    assert out[3].n_new_tokens == 3 and out[0].n_new_tokens == 12
    assert out[3].latency_s < out[0].latency_s  # a row's latency stops when it ends


def test_choose_tokens_top_k_and_top_p_masks() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    sample = torch.tensor([True, True, True])
    temp = torch.ones(3)
    top_k = torch.tensor([2, 4, 4])
    top_p = torch.tensor([1.0, 1.0, 0.5])
    seen: list[set[int]] = [set(), set(), set()]
    for u in torch.linspace(0.001, 0.999, 200):
        toks = choose_tokens(logits, sample, temp, top_k, top_p, u.repeat(3))
        for i, t in enumerate(toks.tolist()):
            seen[i].add(t)
    assert seen == [{0, 1}, {0, 1, 2, 3}, {0}]  # p(token 0) = 0.64 > 0.5, so top_p 0.5 keeps it alone


def _ks_statistic(a: list[int], b: list[int]) -> float:
    points = sorted(set(a) | set(b))
    return max(abs(sum(x <= v for x in a) / len(a) - sum(x <= v for x in b) / len(b)) for v in points)


def test_duplicate_distribution_matches_serial(lm) -> None:
    """Serial (transformers' sampler, global RNG) and batched (ours, per-row RNG) draw from the
    same distribution; with fixed seeds this test is deterministic, so it cannot flake."""
    model, tok = lm
    params = {**SAMPLED, "max_new_tokens": 24, "temperature": 0.8, "top_k": 20}
    n = 120
    seeds = list(range(n))
    serial = [duplicate_count(content_words(generate_one(model, tok, PROMPTS[2], params, s).text)) for s in seeds]
    batched = []
    for i in range(0, n, 12):
        out = generate_batch(model, tok, [Row(PROMPTS[2], params, 10_000 + s) for s in seeds[i : i + 12]])
        batched += [duplicate_count(content_words(g.text)) for g in out]
    d = _ks_statistic(serial, batched)
    critical = 1.63 * math.sqrt(2 / n)  # two-sample KS at alpha = 0.01
    assert d < critical, (d, critical, sum(serial) / n, sum(batched) / n)
    # ...and the test can tell a different distribution apart: greedy decoding.
    greedy = [
        duplicate_count(content_words(g.text))
        for g in generate_batch(model, tok, [Row(PROMPTS[2], {**params, "do_sample": False}, s) for s in range(12)])
    ]
    assert _ks_statistic(serial, greedy * 10) > critical
