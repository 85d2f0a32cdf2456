"""Expansion of a sweep into completions: counts, stable ids, blocks."""

from __future__ import annotations

from pathlib import Path

from rayq.planning import planner, spec
from tests.conftest import sweep_dict


def _sweep(model: Path, **kw) -> spec.Sweep:
    return spec.parse(sweep_dict(model, **kw))


def test_grid_expands_to_the_product(tiny_model: Path) -> None:
    s = _sweep(
        tiny_model,
        precisions=["fp32", "bf16"],
        grid={"max_new_tokens": [4, 8, 16], "temperature": [0.5, 1.0], "top_k": [1, 5, 50], "top_p": [0.9, 1.0]},
        seeds=[3, 7],
    )
    comps = [c for g in planner.groups(s) for c in planner.iter_completions(s, g.model, g.precision)]
    expected = 2 * 3 * 2 * 3 * 2 * 3 * 2  # precisions x max_new_tokens x temp x top_k x top_p x prompts x seeds
    assert len(comps) == expected == planner.total_completions(s)
    assert len({c.completion_id for c in comps}) == expected
    assert {c.seed for c in comps} == {3, 7}
    # every grid parameter is on every completion, swept or not
    assert all(dict(c.params)["repetition_penalty"] == 1.0 and dict(c.params)["do_sample"] for c in comps)


def test_ids_are_stable_and_ignore_the_sweep_name(tiny_model: Path) -> None:
    a = _sweep(tiny_model)
    b = _sweep(tiny_model, name="renamed")
    ids_a = [c.completion_id for c in planner.iter_completions(a, a.spec.models[0], "fp32")]
    ids_b = [c.completion_id for c in planner.iter_completions(b, b.spec.models[0], "fp32")]
    assert ids_a == ids_b
    c = _sweep(tiny_model, grid={"max_new_tokens": [4, 8], "temperature": [0.7, 1.0], "top_k": [1, 51]})
    ids_c = {c.completion_id for c in planner.iter_completions(c, c.spec.models[0], "fp32")}
    assert len(ids_c & set(ids_a)) == len(ids_a) // 2  # top_k=50 cells changed, top_k=1 cells did not


def test_sampling_seed_follows_the_id(tiny_model: Path) -> None:
    s = _sweep(tiny_model)
    comps = list(planner.iter_completions(s, s.spec.models[0], "fp32"))
    assert all(c.sampling_seed == planner.sampling_seed(c.completion_id) for c in comps)
    assert len({c.sampling_seed for c in comps}) == len(comps)


def test_blocks_hold_contiguous_cells(tiny_model: Path) -> None:
    s = _sweep(tiny_model, runtime={"block_by": ["temperature", "top_k"]})
    g = planner.groups(s)[0]
    comps = list(planner.iter_completions(s, g.model, g.precision))
    assert len(g.block_ids) == 4
    for bid in g.block_ids:
        members = [c for c in comps if c.block_id == bid]
        assert len(members) == g.n_completions // 4
        assert len({(dict(c.params)["temperature"], dict(c.params)["top_k"]) for c in members}) == 1


def test_block_tokens_count_every_completion_at_its_max_new_tokens(tiny_model: Path) -> None:
    for block_by in (["temperature", "top_k"], ["max_new_tokens"], []):
        s = _sweep(tiny_model, precisions=["fp32", "bf16"], runtime={"block_by": block_by})
        expected: dict[str, int] = {}
        for g in planner.groups(s):
            for c in planner.iter_completions(s, g.model, g.precision):
                expected[c.block_id] = expected.get(c.block_id, 0) + dict(c.params)["max_new_tokens"]
        assert planner.block_tokens(s) == expected
        assert planner.remaining_work(s, set()).tokens == expected


def test_remaining_work_is_planned_minus_done(tiny_model: Path) -> None:
    s = _sweep(tiny_model, precisions=["fp32", "bf16"])
    comps = [c for g in planner.groups(s) for c in planner.iter_completions(s, g.model, g.precision)]
    fresh = planner.remaining_work(s, set())
    assert fresh.planned == len(comps) == 48 and fresh.done_before == 0
    assert all(v is None for v in fresh.remaining.values()) and len(fresh.remaining) == 8
    # a whole block done, one more completion done, and an id from some other sweep
    first_block = [c.completion_id for c in comps if c.block_id == comps[0].block_id]
    done = {*first_block, comps[-1].completion_id, "not-in-this-sweep"}
    w = planner.remaining_work(s, done)
    assert w.done_before == len(first_block) + 1
    assert comps[0].block_id not in w.remaining
    partial = w.remaining[comps[-1].block_id]
    assert partial is not None and comps[-1].completion_id not in partial and len(partial) == len(first_block) - 1
    assert sum(len(v) if v else len(first_block) for v in w.remaining.values()) == 48 - w.done_before
